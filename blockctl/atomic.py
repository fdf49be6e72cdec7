"""Atomic writes: build a temporary sibling, then rename it into place.

Every file or folder blockctl writes (adapters, training checkpoints, sample grids, merged
models, the toy base, registry blobs) goes through ``atomic_write``, so a crash, Ctrl-C or full
disk never leaves a half-written output under its final name. A temporary is named
``.{name}.tmp-{pid}-{random}`` beside its target; the next write to the same target removes
those of processes that no longer run (killed with SIGKILL, power lost), and nothing else.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # an existing target, moved aside while its replacement moves in


def sibling(target: Path, mark: str) -> Path:
    """A fresh hidden name beside ``target``, on the same file system (so renames are atomic)."""
    return target.parent / f".{target.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        # There ``os.kill(pid, 0)`` terminates the process instead of probing it: count every
        # process as alive, so others' temporaries are left alone.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries of earlier writes to ``target`` whose process is gone. A live
    process's temporaries (this one's included) are left alone: it may still be writing."""
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for mark in (TMP_MARK, OLD_MARK):
        prefix = f".{target.name}{mark}"
        pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]{8}")
        for path in target.parent.glob(f"{glob.escape(prefix)}*"):
            found = pattern.fullmatch(path.name)
            if found is None or _pid_alive(int(found[1])):
                continue
            remove(path)
            removed.append(path)
    return removed


class Staged:
    """A temporary ``temp`` (not yet created: write a file or make a folder there) that
    ``install`` moves to ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.temp = sibling(target, TMP_MARK)
        self.installed = False

    def install(self) -> None:
        """Move ``temp`` to ``target``. An existing file is replaced in one rename; anything
        else is renamed aside first and deleted after, so at every moment ``target`` is either
        the old or the new output, never a mix."""
        target = self.target
        exists = target.exists() or target.is_symlink()
        file_over_file = self.temp.is_file() and (target.is_file() or target.is_symlink())
        if not exists or file_over_file:
            os.replace(self.temp, target)
        else:
            aside = sibling(target, OLD_MARK)
            os.replace(target, aside)
            try:
                os.replace(self.temp, target)
            except BaseException:
                os.replace(aside, target)
                raise
            remove(aside)
        self.installed = True

    def discard(self) -> None:
        if not self.installed:
            remove(self.temp)


@contextlib.contextmanager
def atomic_write(target: Path) -> Iterator[Staged]:
    """Yield a ``Staged`` for ``target``; when the block ends without error its temporary is
    moved into place (unless the block called ``install`` itself), on any error it is removed.
    Whether an existing ``target`` may be replaced is the caller's to check, before."""
    clean_stale(target)
    staged = Staged(target)
    try:
        yield staged
        if not staged.installed:
            staged.install()
    finally:
        staged.discard()
