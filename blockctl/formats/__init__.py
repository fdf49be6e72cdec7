"""Merge outputs, one module per format, and the atomic staging they share.

Every output is built in a temporary sibling ``.{name}.tmp-{pid}-{random}`` in the same folder
and renamed into place at the end, so an interrupted merge never leaves a half-written OUT.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import torch

from blockctl.errors import InvalidInput

if TYPE_CHECKING:
    from blockctl.merge import MergeOptions, MergePlan

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
# Test hook: sleep this many seconds after the first tensor is written, so a test can kill
# the process mid-write. Unset in normal use.
PAUSE_ENV = "BLOCKCTL_TEST_PAUSE_MID_WRITE"


class Writer(Protocol):
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        """The paths the format produces (OUT first, then any sidecars)."""
        ...

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        """Write to ``temps`` (same order as ``outputs``); return notes for the user."""
        ...


def writer_for(fmt: str) -> Writer:
    # Imported here: each format pulls in its own dependencies only when used.
    if fmt == "diffusers":
        from blockctl.formats import diffusers_folder

        return diffusers_folder.WRITER
    if fmt == "single-file":
        from blockctl.formats import single_file

        return single_file.WRITER
    if fmt == "lora":
        from blockctl.formats import lora

        return lora.WRITER
    raise InvalidInput(f"unknown format {fmt!r}")


def computed_ahead(
    keys: Sequence[str], compute: Callable[[str], torch.Tensor], depth: int = 2
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(key, compute(key))`` in order, computed up to ``depth`` ahead in a worker thread, so
    the merge math overlaps the kernel copies of the untouched tensors in between (torch
    releases the GIL). Memory stays bounded by ``depth`` tensors."""
    from concurrent.futures import Future, ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockctl-merge")
    pending: list[tuple[str, Future[torch.Tensor]]] = []
    queue = iter(keys)
    try:
        while True:
            while len(pending) < depth and (key := next(queue, None)) is not None:
                pending.append((key, pool.submit(compute, key)))
            if not pending:
                return
            key, future = pending.pop(0)
            yield key, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pause_mid_write() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        import time

        time.sleep(float(seconds))


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


def clean_stale(out: Path) -> list[Path]:
    """Remove temporaries of earlier merges to ``out`` whose process is gone (SIGKILL, power
    loss). A live process's temporaries are left alone: it may still be writing them."""
    removed: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for mark in (TMP_MARK, OLD_MARK):
        for path in parent.glob(f".{glob.escape(out.name)}{mark}*"):
            pid_text = path.name[len(f".{out.name}{mark}") :].split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
                continue
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(out: Path, mark: str) -> Path:
    return out.parent / f".{out.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def _check_writable(out: Path) -> None:
    parent = out.parent
    if not parent.exists():
        raise InvalidInput(f"cannot write {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise InvalidInput(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInput(f"cannot write {out}: folder {parent} is not writable")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporaries are removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged(outputs: Sequence[Path], *, force: bool) -> Iterator[list[Path]]:
    """Yield temporary siblings for ``outputs``; on success move them into place (replacing
    existing ones only with ``force``), on any failure remove them."""
    for out in outputs:
        _check_writable(out)
        clean_stale(out)
    existing = [o for o in outputs if o.exists() or o.is_symlink()]
    if existing and not force:
        raise InvalidInput(
            f"{existing[0]} already exists", hint="pass --force to replace it atomically"
        )
    for out in existing:
        if not _is_merge_output(out):
            raise InvalidInput(
                f"{out} is not a blockctl merge output; --force only replaces one",
                hint="choose another OUT, or move it away yourself",
            )
    temps = [_sibling(out, TMP_MARK) for out in outputs]
    try:
        with _terminate_as_interrupt():
            yield temps
            # Sidecars first: OUT appearing is what marks the merge as complete.
            for out, tmp in reversed(list(zip(outputs, temps, strict=True))):
                _install(tmp, out)
    except OSError as exc:
        for tmp in temps:
            _remove(tmp)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise InvalidInput(f"cannot write {outputs[0]}: {exc.strerror}") from exc
        raise
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise


def _is_merge_output(path: Path) -> bool:
    """Whether ``path`` carries a merge record: only then may ``--force`` replace it."""
    from blockctl.errors import BlockctlError
    from blockctl.merged_check import read_record

    try:
        read_record(path)
    except BlockctlError:
        return False
    return True


def _install(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is renamed aside first and deleted after,
    so at every moment ``out`` is either the old or the new output, never a mix."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    aside = _sibling(out, OLD_MARK)
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _remove(aside)
