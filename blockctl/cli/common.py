"""What every command module shares: consoles, JSON output, the registry in context."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from registry.base import Registry

console = Console(soft_wrap=True)
# Errors stay on one line whatever the terminal width, so they can be grepped and parsed.
err_console = Console(stderr=True, soft_wrap=True)

REGISTRY_ENV = "BLOCKCTL_REGISTRY"


def default_registry() -> str:
    """``$XDG_DATA_HOME/blockctl/registry`` (``~/.local/share/blockctl/registry``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "blockctl" / "registry")


@dataclass(frozen=True)
class Settings:
    registry: str


def settings(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    obj = root.obj
    if isinstance(obj, Settings):
        return obj
    return Settings(registry=os.environ.get(REGISTRY_ENV) or default_registry())


def open_registry(ctx: typer.Context) -> Registry:
    from registry import open_registry as _open

    return _open(settings(ctx).registry)


def emit_json(obj: Any) -> None:
    """One JSON document on stdout, nothing else, so scripts can parse it."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


@contextmanager
def training_progress(quiet: bool, label: str = "training") -> Iterator[Any]:
    """A rich progress bar on stderr with loss, elapsed time and ETA, yielding the trainer's
    ``progress(step, total, loss)`` callback; None for ``--json`` or off a terminal. A run that
    stops early (``--strength-target``) ends its bar where it stopped."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if quiet or not err_console.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    task = None
    done = 0

    def report(step: int, total: int, loss: float) -> None:
        nonlocal task, done
        if task is None:
            task = bar.add_task("train", total=total, completed=step - 1, loss=loss)
        bar.update(task, completed=step, loss=loss)
        done = step

    with bar:
        yield report
        if task is not None:
            bar.update(task, total=done)
