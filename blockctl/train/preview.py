"""The end-of-training sample grid: does the concept show up, and did the class stay itself?

Rows: the concept prompt, then the class prompt. Columns: the base model (adapter off, the token
at its starting embedding) then the trained model, ``per_cell`` seeds each; both columns use
the same seeds, so differences come from the adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from blockctl.atomic import atomic_write
from blockctl.train.components import Components
from blockctl.train.slot_adapter import ConceptAdapter

LABEL_HEIGHT = 12


@torch.no_grad()
def sample_grid(
    comps: Components,
    adapter: ConceptAdapter,
    prompts: tuple[str, str],
    path: Path,
    *,
    per_cell: int = 4,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
) -> Path:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    parts: dict[str, Any] = dict(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(comps.sample_scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe: Any = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    rows: list[list[Image.Image]] = []
    for prompt in prompts:
        row = []
        for trained in (False, True):
            adapter.set_enabled(trained)
            try:
                gens = [torch.Generator().manual_seed(seed + i) for i in range(per_cell)]
                out = pipe(
                    [prompt] * per_cell,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=gens,
                    output_type="pil",
                )
            finally:
                adapter.set_enabled(True)
            row.extend(out.images)
        rows.append(row)
    return _save_grid(rows, prompts, per_cell, path)


def _save_grid(
    rows: list[list[Image.Image]], prompts: tuple[str, str], per_cell: int, path: Path
) -> Path:
    size = rows[0][0].size[0]
    width = size * len(rows[0])
    height = len(rows) * (size + LABEL_HEIGHT) + LABEL_HEIGHT
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((2, 0), "base", fill=(0, 0, 0))
    draw.text((size * per_cell + 2, 0), "trained", fill=(0, 0, 0))
    y = LABEL_HEIGHT
    for prompt, row in zip(prompts, rows, strict=True):
        draw.text((2, y), prompt, fill=(80, 80, 80))
        for i, image in enumerate(row):
            grid.paste(image, (i * size, y + LABEL_HEIGHT))
        y += size + LABEL_HEIGHT
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as staged:
        grid.save(staged.temp, format="PNG")
    return path
