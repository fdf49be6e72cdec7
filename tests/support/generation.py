"""Generation in the interop tests: a few sampling steps, checked to give a finite image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def generate(pipe: Any, prompt: str, size: int, steps: int = 2) -> np.ndarray:
    """One ``size``×``size`` image from ``prompt`` (seed 0) with any diffusers text-to-image
    pipeline; fails unless it has that shape and every value is finite."""
    image = pipe(
        prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, size, size, 3) and bool(np.isfinite(image).all())
    return image
