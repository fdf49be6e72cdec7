"""The mirror command: copy a registry (typically a Hub one) into --registry, or back."""

from __future__ import annotations

import typer

from blockctl.cli.common import JSON_OPTION, console, emit_json, err_console, open_registry
from blockctl.mirror import mirror as mirror_registry


def mirror(
    ctx: typer.Context,
    other: str = typer.Argument(
        ..., metavar="SOURCE", help="The other registry, e.g. hf://acme/blocks or a folder."
    ),
    push: bool = typer.Option(
        False, "--push", help="Copy --registry into SOURCE instead (creating it if needed)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Copy the registry SOURCE into --registry, or --registry into SOURCE with --push.

    The target is created if absent. Slot numbers, owners and statuses are kept; adapters are
    re-published with their sha256 verified; nothing in the target is ever deleted.
    """
    from registry import open_registry as open_location

    here = open_registry(ctx)
    there = open_location(other)
    source, target = (here, there) if push else (there, here)
    with console.status(f"Mirroring {source.location} into {target.location}…"):
        report = mirror_registry(source, target)
    if json_out:
        emit_json(report.to_dict())
        return
    created = " (created)" if report.created else ""
    console.print(
        f"Mirrored [bold]{report.source}[/] into [bold]{report.target}[/]{created}: "
        f"{len(report.reserved)} reserved, {len(report.copied)} adapter(s) copied "
        f"(sha256 verified), {len(report.released)} released, {report.unchanged} unchanged",
        highlight=False,
    )
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("mirror")(mirror)
