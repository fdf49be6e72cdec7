"""Staging a merge's outputs: every one is built in a temporary sibling
(``blockctl.atomic``) and renamed into place at the end, sidecars first, so an interrupted merge
never leaves a half-written OUT. ``--force`` replaces only an earlier merge output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from blockctl.atomic import atomic_write
from blockctl.errors import InvalidInput
from blockctl.merge.record import is_merge_output


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
    existing ones only with ``force``, and only earlier merge outputs), on any failure remove
    them."""
    for out in outputs:
        _check_writable(out)
    existing = [o for o in outputs if o.exists() or o.is_symlink()]
    if existing and not force:
        raise InvalidInput(
            f"{existing[0]} already exists", hint="pass --force to replace it atomically"
        )
    for out in existing:
        if not is_merge_output(out):
            raise InvalidInput(
                f"{out} is not a blockctl merge output; --force only replaces one",
                hint="choose another OUT, or move it away yourself",
            )
    try:
        # The stack installs in reverse order: sidecars first, since OUT appearing is what
        # marks the merge as complete.
        with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_write(out)) for out in outputs]
            yield [t.temp for t in temps]
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise InvalidInput(f"cannot write {outputs[0]}: {exc.strerror}") from exc
        raise
