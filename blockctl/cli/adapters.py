"""Adapter commands: publish, verify."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry
from blockctl.errors import ValidationFailed
from blockctl.layout import layout_of, sha256_file


def publish(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Adapter .safetensors file to validate and store."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Validate an adapter against the registry, then store it in its concept's slot."""
    from blockctl.verify import check_for_publish

    reg = open_registry(ctx)
    layout = layout_of(reg)
    adapter = check_for_publish(file, layout, reg)
    record = reg.publish(adapter.meta.concept, file, sha256_file(file))
    if json_out:
        emit_json(record.to_dict())
        return
    console.print(
        f"Published [bold]{record.concept}[/] in slot {record.slot} "
        f"({record.size:,} bytes, sha256 {record.sha256[:12]})",
        highlight=False,
    )


def verify(
    ctx: typer.Context,
    json_out: bool = JSON_OPTION,
    merged: Path = typer.Option(
        None,
        "--merged",
        help="Check a merged output instead: weights = base + Σ ΔW.",
        show_default=False,
    ),
    tolerance: float = typer.Option(
        None,
        "--tolerance",
        help="Max relative error for --merged (default: by dtype).",
        show_default=False,
    ),
) -> None:
    """Check every published adapter: intact, at its reserved slot, disjoint from the rest.
    With --merged, check that a merged output's weights equal base + Σ ΔW."""
    if merged is not None:
        from blockctl.cli.merge import verify_merged

        verify_merged(ctx, merged, tolerance, json_out)
        return
    from blockctl.verify import verify_registry

    reg = open_registry(ctx)
    report = verify_registry(reg, layout_of(reg))
    if json_out:
        emit_json(report.to_dict())
    else:
        table = Table(title=f"{len(report.adapters)} published adapter(s)")
        for col in ("slot", "concept", "sha256", "result"):
            table.add_column(col)
        for a in report.adapters:
            result = "[green]ok[/]" if a.ok else "[red]" + "; ".join(a.problems) + "[/]"
            table.add_row(str(a.slot), a.concept, a.sha256[:12], result)
        console.print(table)
        for problem in report.problems:
            console.print(f"[red]✗[/] {problem}", highlight=False)
        if report.ok:
            console.print(
                f"[green]✓[/] all adapters intact and disjoint "
                f"(max |A_s A_tᵀ| = {report.max_cross_product:.1e})",
                highlight=False,
            )
    if not report.ok:
        bad = sum(not a.ok for a in report.adapters) + len(report.problems)
        raise ValidationFailed(f"verify found {bad} problem(s)")


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("verify")(verify)
