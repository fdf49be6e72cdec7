"""Start many Python processes and let them go at the same instant (for races between
processes, not threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Run by every worker before its script: ``wait_for_go()`` marks it ready (imports done) and
# returns when all are released.
_PRELUDE = r"""
import os as _os, sys as _sys, time as _time

def wait_for_go():
    open(_os.environ["RACE_READY"], "w").close()
    deadline = _time.monotonic() + 120
    while not _os.path.exists(_os.environ["RACE_GO"]):
        if _time.monotonic() > deadline:
            _sys.exit("barrier timeout")
        _time.sleep(0.002)
"""


def run_together(
    script: str, argvs: list[list[str]], folder: Path, timeout: float = 120
) -> list[tuple[int, str, str]]:
    """Run ``script`` (which calls ``wait_for_go()`` once its imports are done) in one process
    per argument list, release them together, and return each (exit code, stdout, stderr)."""
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RACE_GO": str(go)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + script, *argv],
            cwd=REPO_ROOT, env={**env, "RACE_READY": str(folder / f"ready-{i}")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, argv in enumerate(argvs)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not all((folder / f"ready-{i}").exists() for i in range(len(argvs))):
            assert time.monotonic() < deadline, "workers did not get ready"
            assert all(p.poll() is None for p in procs), "a worker died before the barrier"
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]
