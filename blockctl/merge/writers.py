"""What the format writers share: the ``Writer`` interface, the choice of writer, the merge
math computed ahead of the copies, and a test hook."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from blockctl.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from blockctl.merge import MergeOptions, MergePlan

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
        from blockctl.merge import diffusers_folder

        return diffusers_folder.WRITER
    if fmt == "single-file":
        from blockctl.merge import single_file

        return single_file.WRITER
    if fmt == "lora":
        from blockctl.merge import lora

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
