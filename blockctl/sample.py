"""Sample a grid of images from a pipeline folder: one row per prompt, ``n`` seeds per row.

Reusable by commands that modify the pipeline first (e.g. merged adapters): load with
``load_pipeline``, change it, then pass it as ``pipe=``. ``sample_composed`` samples a registry's
base with concepts composed in memory (``blockctl.compose``), no merged folder needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw

from blockctl.errors import InvalidInput

if TYPE_CHECKING:
    from blockctl.family import Family
    from registry.base import Registry

CAPTION_H = 12


def default_model() -> Path:
    from blockctl.toy import weights_path

    return weights_path()


def load_pipeline(model_dir: str | Path | None = None, device: str = "cpu") -> Any:
    """An SD or SDXL pipeline (by its ``model_index.json``) in float32 from a local folder
    (offline; no safety checker)."""
    from blockctl.base_model import BaseFolder
    from blockctl.family import SD, family_of_pipeline
    from blockctl.quiet import quiet_libraries

    quiet_libraries()
    path = Path(model_dir) if model_dir is not None else default_model()
    if not (path / "model_index.json").is_file():
        raise InvalidInput(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    family = family_of_pipeline(BaseFolder(path).pipeline_class())
    extra: dict[str, Any] = {}
    if family == SD:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = _pipeline_class(family).from_pretrained(
        path,
        local_files_only=True,
        dtype=torch.float32,  # fp16 on CPU is slow and lossy
        **extra,
    )
    _pool_at_end_tokens(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_class(family: Family) -> Any:
    if family.dual_text:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


def _pool_at_end_tokens(pipe: Any) -> None:
    """conditioning.pool_at_end_token on every text encoder of the pipeline."""
    from blockctl.conditioning import pool_at_end_token

    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if getattr(pipe, encoder, None) is not None:
            pool_at_end_token(getattr(pipe, encoder), getattr(pipe, tokenizer))


def assemble_pipeline(family: Family, parts: dict[str, Any]) -> Any:
    """A pipeline of the family around already-loaded parts (vae, unet, text encoders,
    tokenizers, scheduler), e.g. ones carrying a concept."""
    extra: dict[str, Any] = {}
    if not family.dual_text:
        extra = {"safety_checker": None, "feature_extractor": None,
                 "requires_safety_checker": False}  # fmt: skip
    pipe = _pipeline_class(family)(**parts, **extra)
    _pool_at_end_tokens(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    n: int = 4,
) -> list[list[Image.Image]]:
    """``n`` images per prompt; image j of every prompt uses seed ``seed + j`` so rows compare."""
    if not prompts:
        raise InvalidInput("give at least one prompt")
    if n <= 0 or steps <= 0:
        raise InvalidInput("--n and --steps must be positive")
    if guidance < 0:
        raise InvalidInput("--guidance must not be negative")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    gens = [torch.Generator().manual_seed(seed + j) for _ in prompts for j in range(n)]
    out = pipe(
        [p for p in prompts for _ in range(n)],
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
    ).images
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def make_grid(rows: list[list[Image.Image]], captions: Sequence[str]) -> Image.Image:
    """Rows of images, each with its caption in a strip above it."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * (h + CAPTION_H)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (row, cap) in enumerate(zip(rows, captions, strict=True)):
        y = i * (h + CAPTION_H)
        draw.text((2, y), cap[: cols * w // 6], fill="black")
        for j, im in enumerate(row):
            grid.paste(im, (j * w, y + CAPTION_H))
    return grid


def sample(
    model_dir: str | Path | None,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    n: int = 4,
    pipe: Any = None,
) -> Image.Image:
    """A captioned grid: one row per prompt, ``n`` seeds per row."""
    pipe = pipe if pipe is not None else load_pipeline(model_dir)
    return make_grid(generate(pipe, prompts, seed, steps, guidance, n), prompts)


def sample_composed(
    registry: Registry,
    concepts: Sequence[str],
    prompts: Sequence[str],
    scales: Mapping[str, float] | None = None,
    model_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    n: int = 4,
) -> Image.Image:
    """A captioned grid from the registry's base (or ``model_dir``, which must hold the same
    weights) with ``concepts`` composed in memory: the images a merged folder of the same
    concepts gives, without writing one."""
    from blockctl.compose import Composer
    from blockctl.merge import plan_merge

    plan = plan_merge(registry, concepts, scales or {})  # bad requests fail before the load
    pipe = load_pipeline(model_dir if model_dir is not None else plan.base.root)
    with Composer(pipe, registry) as composer:
        composer.use(plan)
        return sample(None, prompts, seed, steps, guidance, n, pipe=pipe)
