"""The ``eval`` command: identity metrics of concepts in a merged model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry


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
    clip: Path = typer.Option(
        None,
        "--clip",
        help="Local CLIP model folder (transformers CLIPModel + CLIPProcessor): adds CLIP image "
        "alignment (merged vs the concept alone, same seeds) and text alignment (merged image vs "
        "'a photo of a {class}').",
    ),
    clip_images: int = typer.Option(4, "--clip-images", min=1, help="Images per concept for CLIP."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure how well each concept keeps its identity in a merged model.

    retention 1 = all of the concept's own change survives; crosstalk 0 = the other concepts
    add nothing on its prompts; fidelity 1 = both; prior interference 0 = "a photo of a
    {class}" is untouched by the merge; prior drift = the same for the concept alone.
    """
    from blockctl.clip_score import ClipConfig
    from blockctl.evaluate import EvalConfig, evaluate

    reg = open_registry(ctx)
    with console.status("Evaluating…"):
        clip_config = None if clip is None else ClipConfig(clip, images=clip_images, seed=seed)
        rows = evaluate(reg, concepts, merged, EvalConfig(samples=samples, seed=seed), clip_config)
    if json_out:
        emit_json([r.to_dict() for r in rows])
        return
    table = Table(
        title=f"identity metrics ({'merged: ' + str(merged) if merged else 'in-memory merge'})"
    )
    cols: tuple[str, ...] = (
        "concept",
        "slot",
        "retention",
        "crosstalk",
        "fidelity",
        "prior interf.",
        "prior drift",
        "‖δ‖²",
    )
    if clip is not None:
        cols = (*cols, "CLIP image", "CLIP text")
    for col in cols:
        table.add_column(col, justify="left" if col == "concept" else "right")
    for r in rows:
        cells = [
            r.concept, str(r.slot), f"{r.retention:.3f}", f"{r.crosstalk:.3f}", f"{r.fidelity:.3f}",
            f"{r.prior_interference:.3f}", f"{r.prior_drift:.3f}", f"{r.delta_sq:.2e}",
        ]  # fmt: skip
        if clip is not None:
            cells += [f"{r.clip_image_alignment:.3f}", f"{r.clip_text_alignment:.3f}"]
        table.add_row(*cells)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
