"""Commands around the embedded toy base: demo concept photos and sampling."""

from __future__ import annotations

from pathlib import Path

import typer

from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry
from blockctl.errors import InvalidInput


def toy_photos(
    out: Path = typer.Argument(..., help="Folder to write the PNGs into."),
    concept: str = typer.Option(..., "--concept", "-c", help="A demo concept name."),
    n: int = typer.Option(12, "--n", help="How many photos."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same photos."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Render photos of a demo concept the toy base never saw (PNGs only; captions in --json)."""
    from blockctl.toy.concepts import CONCEPTS, render_concept

    if concept not in CONCEPTS:
        raise InvalidInput(
            f"unknown concept {concept!r}", hint="known: " + ", ".join(sorted(CONCEPTS))
        )
    if n <= 0:
        raise InvalidInput(f"--n must be positive, got {n}")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InvalidInput(f"{out} is not empty", hint="use --force to write into it anyway")
    out.mkdir(parents=True, exist_ok=True)
    spec = CONCEPTS[concept]
    files = []
    for i, (img, caption) in enumerate(render_concept(concept, n, seed)):
        path = out / f"{concept}_{i:03d}.png"
        img.save(path)
        files.append({"file": str(path), "caption": caption})
    if json_out:
        emit_json(
            {
                "concept": concept,
                "kind": spec.kind,
                "class_word": spec.class_word,
                "out": str(out),
                "images": files,
            }
        )
    else:
        console.print(
            f"Wrote {n} photos of [bold]{concept}[/] ({spec.kind}, class "
            f"'{spec.class_word}') to {out}"
        )


def sample_cmd(
    ctx: typer.Context,
    prompts: list[str] = typer.Argument(..., help="One or more prompts (one grid row each)."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    model: Path = typer.Option(
        None, "--model", help="Diffusers pipeline folder. Default: the shipped toy base."
    ),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(20, "--steps", help="Sampling steps (DPM-Solver++)."),
    guidance: float = typer.Option(4.0, "--guidance", help="Classifier-free guidance scale."),
    n: int = typer.Option(4, "--n", help="Images per prompt."),
    concepts: str = typer.Option(
        None,
        "--concepts",
        help="NAME,NAME,...: published concepts of the registry composed into its base in "
        "memory (no merged folder needed). --model defaults to the registry's base.",
        show_default=False,
    ),
    scale: list[str] = typer.Option(
        None, "--scale", help="NAME=FLOAT: strength of one --concepts concept.", show_default=False
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Sample a captioned grid: one row per prompt, N seeds per row."""
    from blockctl.merge import parse_scales
    from blockctl.sample import sample, sample_composed

    if n <= 0 or steps <= 0:
        raise InvalidInput("--n and --steps must be positive")
    if output.suffix.lower() != ".png":
        raise InvalidInput(f"--output must be a .png file, got {output}")
    names = [c.strip() for c in concepts.split(",")] if concepts is not None else []
    if concepts is not None and not all(names):
        raise InvalidInput(f"--concepts takes names separated by commas, got {concepts!r}")
    scales = parse_scales(scale or [])
    if scales and not names:
        raise InvalidInput("--scale needs --concepts")
    with console.status(f"Sampling {len(prompts)} x {n} images..."):
        if names:
            grid = sample_composed(
                open_registry(ctx), names, prompts, scales, model, seed, steps, guidance, n
            )
        else:
            grid = sample(model, prompts, seed=seed, steps=steps, guidance=guidance, n=n)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    if json_out:
        emit_json(
            {"output": str(output), "prompts": prompts, "n": n, "seed": seed, "concepts": names}
        )
    else:
        console.print(f"Wrote {output}")


def register(app: typer.Typer) -> None:
    app.command("toy-photos")(toy_photos)
    app.command("sample")(sample_cmd)
