"""The one atomic-write helper: temporary sibling, rename into place, nothing half-written, and
only blockctl's own temporaries of dead processes ever cleaned up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from blockctl.atomic import atomic_write, clean_stale

DEAD = 999_999_999  # no process has this id


def test_file_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with atomic_write(target) as staged:
        assert staged.temp.parent == tmp_path and staged.temp.name.startswith(".a.txt.tmp-")
        staged.temp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with atomic_write(target) as staged:  # an existing file is replaced in one rename
        staged.temp.write_text("two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_folder_replaces_folder_and_failure_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_write(target) as staged:
        staged.temp.mkdir()
        (staged.temp / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as staged:
        staged.temp.mkdir()
        (staged.temp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert (target / "x").read_text() == "old"
    with atomic_write(target) as staged:
        staged.temp.mkdir()
        (staged.temp / "y").write_text("new")
    assert [p.name for p in target.iterdir()] == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_explicit_install_then_error_keeps_the_installed_file(tmp_path: Path) -> None:
    """A caller may install inside the block (the registry does, under its transaction)."""
    target = tmp_path / "blob"
    with pytest.raises(RuntimeError), atomic_write(target) as staged:
        staged.temp.write_text("placed")
        staged.install()
        raise RuntimeError("after install: the caller decides what to undo")
    assert target.read_text() == "placed"


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = tmp_path / f".m.tmp-{DEAD}-0123abcd"
    dead.mkdir()
    aside = tmp_path / f".m.old-{DEAD}-0123abcd"
    aside.write_text("an old output moved aside by a killed merge")
    alive = tmp_path / f".m.tmp-{os.getppid()}-0123abcd"
    alive.write_text("someone else's write in progress")
    other = tmp_path / f".n.tmp-{DEAD}-0123abcd"
    other.write_text("another target's")
    foreign = [tmp_path / ".m.tmp-notes", tmp_path / f".m.tmp-{DEAD}-mine.txt"]
    for path in foreign:
        path.write_text("a name blockctl never writes")
    assert sorted(clean_stale(tmp_path / "m")) == sorted([dead, aside])
    assert alive.exists() and other.exists() and all(p.exists() for p in foreign)


def test_stale_check_never_signals_processes_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Windows ``os.kill(pid, 0)`` would terminate the process it means to probe."""

    def forbidden(pid: int, sig: int) -> None:
        raise AssertionError("os.kill called")

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", forbidden)
    other = tmp_path / f".m.tmp-{DEAD}-0123abcd"
    other.write_text("maybe another process's write")
    assert clean_stale(tmp_path / "m") == []
    assert other.exists()
