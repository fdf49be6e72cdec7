"""Running the ``blockctl`` command line from tests: one helper for all of them."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from typer.testing import CliRunner

from blockctl.cli import app
from registry import Registry


class CliResult(NamedTuple):
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Both streams, for assertion messages and needles that may be on either."""
        return self.stdout + self.stderr


def cli(
    registry: str | Path | Registry | None,
    *args: str | Path,
    width: int | None = None,
    env: Mapping[str, str] | None = None,
) -> CliResult:
    """``blockctl [--registry REGISTRY] ARGS`` run in-process; ``width`` sets the terminal
    width rich formats help and tables for."""
    prefix = []
    if registry is not None:
        location = registry.location if isinstance(registry, Registry) else str(registry)
        prefix = ["--registry", location]
    environment = dict(env or {})
    if width is not None:
        environment["COLUMNS"] = str(width)
    result = CliRunner().invoke(app, [*prefix, *map(str, args)], env=environment)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def blockctl_command(*args: str | Path) -> list[str]:
    """The command line of a real ``blockctl`` process, for tests that need one (to kill it
    mid-write, or to see what a fresh interpreter imports)."""
    return [sys.executable, "-m", "blockctl", *map(str, args)]
