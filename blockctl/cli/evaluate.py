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
    samples: int = typer.Option(16, "--samples", min=1, help="Noised latents per prompt."),
    seed: int = typer.Option(0, "--seed", help="Seed of latents, noises, timesteps and images."),
    guidance: float = typer.Option(
        4.0, "--guidance", min=0.0, help="Guidance of the guided figures and of the images."
    ),
    images: int = typer.Option(
        4, "--images", min=0, help="Images per concept for sample identity and CLIP (0: none)."
    ),
    sample_steps: int = typer.Option(20, "--sample-steps", min=1, help="Sampler steps per image."),
    clip: Path = typer.Option(
        None,
        "--clip",
        help="Local CLIP model folder (transformers CLIPModel + CLIPProcessor): adds CLIP image "
        "alignment (merged vs the concept alone, same seeds) and text alignment (merged image vs "
        "'a photo of a {class}').",
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Measure how well each concept keeps its identity in a merged model.

    retention 1 = all of the concept's own change survives; crosstalk 0 = the other concepts
    add nothing on its prompts; prior interference 0 = "a photo of a {class}" is untouched by
    the merge; empty 0 = nor is the empty prompt (which guidance amplifies); "guided" = the same
    on the guided prediction a sampler uses; sample identity 1 = the merged model's images of
    the concept match the concept-alone model's (same seeds), 0 = no closer than the base's.
    Figures are ratios to the concept's own change ‖δ‖²; means and worst cases close the table.
    """
    from blockctl.clip_score import ClipConfig
    from blockctl.evaluate import EvalConfig, evaluate, summarize

    reg = open_registry(ctx)
    config = EvalConfig(
        samples=samples, seed=seed, guidance=guidance, images=images, sample_steps=sample_steps
    )
    with console.status("Evaluating…"):
        rows = evaluate(reg, concepts, merged, config, None if clip is None else ClipConfig(clip))
    summary = summarize(rows)
    if json_out:
        emit_json({"concepts": [r.to_dict() for r in rows], "summary": summary})
        return
    columns = [c for c in COLUMNS if any(getattr(r, c[0]) is not None for r in rows)]
    table = Table(
        title=f"identity metrics ({'merged: ' + str(merged) if merged else 'in-memory merge'})"
    )
    # Fits 100 columns: two-line titles, numbers never wrapped (slots are in --json).
    table.add_column("concept")
    for _, title, _ in columns:
        table.add_column(title, justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        cells = [_cell(getattr(r, key), fmt) for key, _, fmt in columns]
        table.add_row(r.concept, *cells, end_section=i == len(rows) - 1)
    for which in ("mean", "worst"):
        cells = [_cell(summary.get(key, {}).get(which), fmt) for key, _, fmt in columns]
        table.add_row(f"[bold]{which}[/]", *cells)
    console.print(table)


# (field, column title, number format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("retention", "reten-\ntion", ".3f"),
    ("crosstalk", "cross-\ntalk", ".3f"),
    ("prior_interference", "prior\ninterf.", ".3f"),
    ("empty_interference", "empty\ninterf.", ".3f"),
    ("guided_crosstalk", "guided\ncrosstalk", ".3f"),
    ("guided_prior_interference", "guided\nprior", ".3f"),
    ("sample_identity", "sample\nidentity", ".3f"),
    ("clip_image_alignment", "CLIP\nimage", ".3f"),
    ("clip_text_alignment", "CLIP\ntext", ".3f"),
    ("delta_sq", "‖δ‖²", ".2e"),
)


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
