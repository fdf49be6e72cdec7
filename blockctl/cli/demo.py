"""The ``demo`` command: the whole BlockLoRA story offline on the toy base."""

from __future__ import annotations

from pathlib import Path

import typer

from blockctl.cli.common import (
    JSON_OPTION,
    console,
    emit_json,
    err_console,
    training_progress,
)
from blockctl.demo import DEFAULT_CONCEPTS, DEMO_STEPS, DemoConfig, run_demo, summary_dict


def demo(
    out: Path = typer.Option(
        Path("blockctl-demo"), "--out", "-o", help="Folder for everything the demo makes."
    ),
    concepts: list[str] = typer.Option(
        list(DEFAULT_CONCEPTS), "--concept", "-c", help="Toy concepts to use (repeat the option)."
    ),
    steps: int = typer.Option(
        DEMO_STEPS, "--steps", min=1, help="Training steps per concept (train's default: 600)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of photos, training and sampling."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty OUT."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Run the whole story offline on the toy base.

    Registry, photos, three concepts trained in their slots, verify, merge, eval, samples.
    """
    config = DemoConfig(out=out, concepts=tuple(concepts), steps=steps, seed=seed, force=force)
    say = (
        (lambda m: err_console.print(m, highlight=False, markup=False))
        if json_out
        else (lambda m: console.print(m, highlight=False, markup=False))
    )
    result = run_demo(config, say=say, progress=lambda label: training_progress(json_out, label))
    if json_out:
        emit_json(summary_dict(result))
        return
    console.print(
        f"\nDone in {result.seconds:.0f} s. Everything is in {result.out}/:\n"
        f"  registry/      the registry (try: blockctl --registry {result.registry} slots)\n"
        f"  photos/        the toy photos each concept was trained on\n"
        f"  runs/          training runs (adapters and their checkpoints)\n"
        f"  merged/        the merged diffusers pipeline (load with from_pretrained)\n"
        f"  samples.png    base vs merged samples\n"
        f"  summary.json   the numbers above",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
