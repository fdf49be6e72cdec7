"""The ``eval`` command: identity metrics of concepts in a merged model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry
from blockctl.evaluate import EvalConfig, evaluate


def eval_command(
    ctx: typer.Context,
    concepts: list[str] = typer.Argument(
        ..., help="Concepts to measure (published in the registry)."
    ),
    merged: Path = typer.Option(
        None, "--merged", help="Merged diffusers folder; default: merge exactly CONCEPTS in memory."
    ),
    samples: int = typer.Option(4, "--samples", min=1, help="Noised latents per prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed of latents, noises and timesteps."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure how well each concept keeps its identity in a merged model.

    retention 1 = all of the concept's own change survives; crosstalk 0 = the other concepts
    add nothing on its prompts; fidelity 1 = both; prior interference 0 = "a photo of a
    {class}" is untouched by the merge; prior drift = the same for the concept alone.
    """
    reg = open_registry(ctx)
    with console.status("Evaluating…"):
        rows = evaluate(reg, concepts, merged, EvalConfig(samples=samples, seed=seed))
    if json_out:
        emit_json([r.to_dict() for r in rows])
        return
    table = Table(
        title=f"identity metrics ({'merged: ' + str(merged) if merged else 'in-memory merge'})"
    )
    cols = (
        "concept",
        "slot",
        "retention",
        "crosstalk",
        "fidelity",
        "prior interf.",
        "prior drift",
        "‖δ‖²",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "concept" else "right")
    for r in rows:
        table.add_row(
            r.concept, str(r.slot), f"{r.retention:.3f}", f"{r.crosstalk:.3f}", f"{r.fidelity:.3f}",
            f"{r.prior_interference:.3f}", f"{r.prior_drift:.3f}", f"{r.delta_sq:.2e}",
        )  # fmt: skip
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
