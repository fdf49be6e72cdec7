"""The ``blockctl`` command line: a thin layer that parses options, calls the library, prints.

Errors from the library (``blockctl.errors``) become one line on stderr and their exit code;
``BLOCKCTL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.markup import escape
from typer._click import Context as _ClickContext  # typer >= 0.29 vendors click
from typer.core import TyperGroup

from blockctl import __version__
from blockctl.cli.common import REGISTRY_ENV, Settings, default_registry, err_console
from blockctl.errors import BlockctlError


def _debug() -> bool:
    return os.environ.get("BLOCKCTL_DEBUG", "") not in ("", "0")


class _ErrorMappingGroup(TyperGroup):
    """Maps library errors to exit codes once, for every command."""

    def invoke(self, ctx: _ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BlockctlError as exc:
            if _debug():
                raise
            err_console.print(f"[bold red]Error:[/] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _debug():
                raise
            err_console.print(
                f"[bold red]Unexpected error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                "[dim]Run with BLOCKCTL_DEBUG=1 for the traceback.[/]",
                highlight=False,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    name="blockctl",
    cls=_ErrorMappingGroup,
    help=(
        "Modular customization of Stable Diffusion with BlockLoRA: reserve a block slot, "
        "train a concept in it, verify adapters are disjoint, merge any subset instantly."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blockctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    registry: str = typer.Option(
        None,
        "--registry",
        "-r",
        envvar=REGISTRY_ENV,
        help=(
            "Registry location: a local folder, or hf://[datasets/]org/name[@rev] for a Hub "
            f"registry. Default: {default_registry()}"
        ),
        show_default=False,
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    ctx.obj = Settings(registry=registry or default_registry())


def _register_commands() -> None:
    from blockctl.cli import adapters, demo, evaluate, merge, mirror, slots, toy, train

    # Registration order is the order --help lists them: the story from setup to results.
    for module in (demo, slots, adapters, train, merge, evaluate, mirror, toy):
        module.register(app)


_register_commands()


def main() -> None:
    # Library chatter (torchvision fallbacks, loading bars) would drown the command's output;
    # users who want it can still set these variables themselves.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
