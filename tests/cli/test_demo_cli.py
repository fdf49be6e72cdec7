"""``blockctl demo``: refusals are instant; the full run (few steps) is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import cli


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = cli(None, "demo", "--out", str(tmp_path))
    assert result.code == 2 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.fixture
def stop_after_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the demo right after it prepared OUT (before any training)."""
    import registry

    def refuse(location: str) -> None:
        raise RuntimeError("stopped after prepare")

    monkeypatch.setattr(registry, "open_registry", refuse)


@pytest.mark.usefixtures("stop_after_prepare")
@pytest.mark.parametrize("as_cwd", [False, True])
def test_force_refuses_a_folder_no_demo_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_cwd: bool
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    out = str(tmp_path)
    if as_cwd:  # ``-o . --force`` once deleted the current folder
        monkeypatch.chdir(tmp_path)
        out = "."
    result = cli(None, "demo", "--out", out, "--force")
    assert result.code == 2, result.output
    assert "not made by blockctl demo" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.usefixtures("stop_after_prepare")
def test_force_removes_only_what_a_demo_wrote(tmp_path: Path) -> None:
    from blockctl.demo import MARKER

    out = tmp_path / "demo"
    (out / "registry").mkdir(parents=True)
    (out / "registry" / "registry.db").write_text("old")
    (out / "samples.png").write_text("old")
    (out / MARKER).write_text("")
    (out / "notes.txt").write_text("the user's own")
    result = cli(None, "demo", "--out", str(out), "--force")
    assert "stopped after prepare" in result.stderr  # prepared, then stopped by the fixture
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own"


def test_unknown_concept_lists_known_ones(tmp_path: Path) -> None:
    result = cli(None, "demo", "--out", str(tmp_path / "d"), "--concept", "nope")
    assert result.code == 2 and "rex" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_full_demo_with_few_steps(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = cli(None, "demo", "--out", str(out), "--steps", "5", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [m["concept"] for m in summary["metrics"]] == ["rex", "brick", "vangogh"]
    assert (out / "samples.png").is_file() and (out / "merged" / "model_index.json").is_file()
