"""The ``merge`` command: any subset of published concepts into a ready-to-use model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry
from blockctl.merge.choices import DEFAULT_FORMAT, DEFAULT_LORA_KEYS, LoraKeyStyle, MergeFormat


def merge(
    ctx: typer.Context,
    concepts: list[str] = typer.Argument(
        None, help="Published concepts to merge.", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the merged output."),
    fmt: Annotated[
        MergeFormat,
        typer.Option(
            "--format",
            "-f",
            help="diffusers (pipeline folder), single-file (original SD layout) or lora.",
        ),
    ] = DEFAULT_FORMAT,
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="float32, float16 or bfloat16. Default: the base's dtype.",
        show_default=False,
    ),
    scale: list[str] = typer.Option(
        None,
        "--scale",
        help="NAME=FLOAT: strength of one concept (default 1.0). Repeatable.",
        show_default=False,
    ),
    lora_keys: Annotated[
        LoraKeyStyle,
        typer.Option(
            "--lora-keys",
            help="Key style of --format lora: kohya (read by diffusers, ComfyUI, AUTOMATIC1111) "
            "or peft (diffusers' own save_lora_weights keys).",
        ),
    ] = DEFAULT_LORA_KEYS,
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT atomically."),
    copy: bool = typer.Option(False, "--copy", help="Copy unchanged files instead of linking."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Merge published concepts into one model: W' = W + Σ scale·B_s A_s per target.

    Written atomically (a temporary sibling, then a rename); same inputs, same bytes.
    """
    from blockctl.merge import MergeOptions, parse_scales
    from blockctl.merge import merge as run_merge

    options = MergeOptions(
        out=out,
        format=fmt,
        dtype=dtype,
        scales=parse_scales(scale or []),
        lora_keys=lora_keys,
        force=force,
        copy=copy,
    )
    options.check()  # bad options fail before the registry is even opened
    result = run_merge(open_registry(ctx), list(concepts or []), options)
    if json_out:
        emit_json(result.to_dict())
        return
    names = ", ".join(f"{s.concept} (slot {s.slot})" for s in result.selected)
    console.print(
        f"Merged {names} into [bold]{result.out}[/] ({result.format}, "
        f"{result.bytes / 1e6:,.1f} MB, {result.seconds:.2f} s)",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


def verify_merged(ctx: typer.Context, path: Path, tolerance: float | None, json_out: bool) -> None:
    """``verify --merged``: recompute the expected weights independently and compare."""
    from blockctl.errors import InvalidInput, ValidationFailed
    from blockctl.merged_check import check_merged

    if tolerance is not None and not tolerance >= 0:
        raise InvalidInput(f"--tolerance must be a non-negative number, got {tolerance}")
    report = check_merged(open_registry(ctx), path, tolerance)
    if json_out:
        emit_json(report.to_dict())
    else:
        for component, err in sorted(report.errors.items()):
            mark = "[green]✓[/]" if err <= report.tolerance else "[red]✗[/]"
            console.print(
                f"{mark} {component}: max relative error {err:.2e} "
                f"(tolerance {report.tolerance:.0e}; worst {report.worst[component]})",
                highlight=False,
            )
        for problem in report.problems:
            console.print(f"[red]✗[/] {problem}", highlight=False)
        if report.ok:
            console.print(
                f"[green]✓[/] {path} = base + Σ ΔW of {', '.join(report.concepts)} "
                f"({report.checked} tensors)",
                highlight=False,
            )
    if not report.ok:
        why = "".join(f"; {problem}" for problem in report.problems)
        raise ValidationFailed(
            f"{path} does not match base + Σ ΔW within {report.tolerance:.0e}{why}"
        )
