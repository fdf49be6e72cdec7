"""``blockctl train PHOTOS --concept NAME``: train a concept in its slot and publish it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from blockctl.cli.common import (
    JSON_OPTION,
    console,
    emit_json,
    err_console,
    open_registry,
    settings,
    training_progress,
)
from blockctl.names import check_concept
from blockctl.train.config import MixedPrecision, RoeLatents, Schedule, TrainConfig

DEFAULT_RUNS = Path("blockctl-runs")


def _default(name: str) -> str:
    """Shown in --help; read from TrainConfig so help and behaviour never disagree."""
    return str(getattr(TrainConfig, name))


def train(
    ctx: typer.Context,
    photos: Path = typer.Argument(
        ...,
        help="Folder of the concept's photos (jpg/png/webp; "
        "optional IMAGE.txt caption beside each).",
    ),
    concept: str = typer.Option(..., "--concept", "-c", help="Concept with a reserved slot."),
    steps: int = typer.Option(
        None, "--steps", help="Optimizer steps.", show_default=_default("steps")
    ),
    lr: float = typer.Option(
        None, "--lr", help="Learning rate of the slot blocks B.", show_default=_default("lr")
    ),
    embedding_lr: float = typer.Option(
        None,
        "--embedding-lr",
        help="Learning rate of the token embedding.",
        show_default=_default("embedding_lr"),
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Photos per step.", show_default=_default("batch_size")
    ),
    grad_accum: int = typer.Option(
        None, "--grad-accum", help="Gradient accumulation.", show_default=_default("grad_accum")
    ),
    warmup_steps: int = typer.Option(
        None, "--warmup-steps", help="LR warmup.", show_default=_default("warmup_steps")
    ),
    schedule: Annotated[
        Schedule | None,
        typer.Option("--schedule", help="LR schedule.", show_default=_default("schedule")),
    ] = None,
    roe: bool = typer.Option(
        None, "--roe/--no-roe", help="Randomized Output Erasure.", show_default="on"
    ),
    roe_prob: float = typer.Option(
        None,
        "--roe-prob",
        help="Chance of an erasure batch per step.",
        show_default=_default("roe_prob"),
    ),
    roe_weight: float = typer.Option(
        None, "--roe-weight", help="λ of the erasure loss.", show_default=_default("roe_weight")
    ),
    roe_batch_size: int = typer.Option(
        None, "--roe-batch-size", help="Erasure prompts per step.", show_default="half the batch"
    ),
    roe_latents: Annotated[
        RoeLatents | None,
        typer.Option(
            "--roe-latents",
            help="Latents the erasure prompts are asked on: concept (the photos), random "
            "(Gaussian), or mixed.",
            show_default=_default("roe_latents"),
        ),
    ] = None,
    token_isolation: float = typer.Option(
        None,
        "--token-isolation",
        help="Weight of the penalty that keeps the learnt token's effect on the prompt "
        "encoding out of other slots' subspaces (0 = off).",
        show_default=_default("token_isolation"),
    ),
    token_norm_bound: float = typer.Option(
        None,
        "--token-norm-bound",
        help="Keep the learnt token's norm within this multiple of the vocabulary's largest "
        "row norm (0 = unbounded).",
        show_default=_default("token_norm_bound"),
    ),
    roe_standin: float = typer.Option(
        None,
        "--roe-standin",
        help="Share of erasure prompts holding random stand-in tokens where another "
        "concept's token would sit.",
        show_default=_default("roe_standin"),
    ),
    roe_standin_offset: float = typer.Option(
        None,
        "--roe-standin-offset",
        help="A stand-in's random offset from its vocabulary row, × that row's norm.",
        show_default=_default("roe_standin_offset"),
    ),
    roe_empty: float = typer.Option(
        None,
        "--roe-empty",
        help="Share of erasure prompts that are the empty prompt (what guidance subtracts).",
        show_default=_default("roe_empty"),
    ),
    strength_target: float = typer.Option(
        None,
        "--strength-target",
        help="Stop once the concept's learning strength (probe ‖δ‖²) reaches this; --steps is "
        "then the most a slow learner takes (0 = train exactly --steps).",
        show_default=_default("strength_target"),
    ),
    min_steps: int = typer.Option(
        None,
        "--min-steps",
        help="Fewest steps before --strength-target may stop training.",
        show_default=_default("min_steps"),
    ),
    seed: int = typer.Option(
        None, "--seed", help="Seed of every random draw.", show_default=_default("seed")
    ),
    checkpoint_every: int = typer.Option(
        None,
        "--checkpoint-every",
        help="Save a checkpoint every N steps.",
        show_default=_default("checkpoint_every"),
    ),
    mixed_precision: Annotated[
        MixedPrecision | None,
        typer.Option(
            "--mixed-precision",
            help="Mixed precision (bf16, fp16: GPU only).",
            show_default=_default("mixed_precision"),
        ),
    ] = None,
    resolution: int = typer.Option(
        None,
        "--resolution",
        help="Side of the training square in pixels (photos: shorter side resized to it, aspect "
        "kept, centre-cropped).",
        show_default="the base's own: 1024 SDXL, 512 SD 1.5, 64 toy",
    ),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory, slower steps, same "
        "gradients.",
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Run folder.", show_default="./blockctl-runs/CONCEPT"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the run folder's last checkpoint."
    ),
    publish: bool = typer.Option(
        True, "--publish/--no-publish", help="Publish the adapter when done."
    ),
    owner: str = typer.Option(
        None, "--owner", help="Refuse unless the slot is held by this owner."
    ),
    base: str = typer.Option(
        None, "--base", help="Base model override (must match the registry's)."
    ),
    sample: bool = typer.Option(
        True, "--sample/--no-sample", help="Render a before/after sample grid."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Train a concept inside its reserved slot (with ROE) and publish the adapter."""
    from blockctl.train import TrainRequest
    from blockctl.train import train as run_training

    check_concept(concept)
    given = dict(
        steps=steps,
        lr=lr,
        embedding_lr=embedding_lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_steps=warmup_steps,
        schedule=schedule,
        roe=roe,
        roe_prob=roe_prob,
        roe_weight=roe_weight,
        roe_batch_size=roe_batch_size,
        roe_latents=roe_latents,
        token_isolation=token_isolation,
        token_norm_bound=token_norm_bound,
        roe_standin=roe_standin,
        roe_standin_offset=roe_standin_offset,
        roe_empty=roe_empty,
        strength_target=strength_target,
        min_steps=min_steps,
        seed=seed,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        resolution=resolution,
        gradient_checkpointing=gradient_checkpointing or None,  # None: not given
    )
    overrides = {k: v for k, v in given.items() if v is not None}
    out_dir = out if out is not None else DEFAULT_RUNS / concept
    hint = shlex.join(
        [
            "blockctl",
            "--registry",
            settings(ctx).registry,
            "train",
            str(photos),
            "--concept",
            concept,
            "--out",
            str(out_dir),
            "--resume",
        ]
    )
    request = TrainRequest(
        photos=photos,
        concept=concept,
        out_dir=out_dir,
        overrides=overrides,
        resume=resume,
        publish=publish,
        owner=owner,
        base=base,
        sample=sample,
        resume_hint=hint,
    )
    registry = open_registry(ctx)

    def say(message: str) -> None:
        err_console.print(message, highlight=False, markup=False)

    with training_progress(json_out) as report:
        result = run_training(registry, request, say=say, progress=report)
    if not result.main_process:
        return  # one report per run: the main process's
    if json_out:
        emit_json(result.to_dict())
        return
    console.print(
        f"Trained [bold]{concept}[/] for {result.steps} steps in {result.seconds:.0f}s "
        f"(final loss {result.final_loss:.4f})\n"
        f"adapter {result.adapter}  sha256 {result.sha256[:12]}"
        + ("\npublished to the registry" if result.published else "\nnot published (--no-publish)")
        + (f"\nsamples {result.grid}" if result.grid else ""),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train)
