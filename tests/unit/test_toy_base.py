"""The shipped toy base loads offline and its UNet answers to the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from blockctl.toy import weights_path


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    path = weights_path()
    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def test_weights_are_small_safetensors_only() -> None:
    files = [p for p in Path(weights_path()).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15_000_000
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3


@torch.no_grad()
def test_unet_responds_to_prompt(pipe: StableDiffusionPipeline) -> None:
    tok = pipe.tokenizer
    assert tok.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    caps = ["a red circle on a plain background", "a blue star on a striped background", ""]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    ctx = pipe.text_encoder(ids.input_ids)[0]
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    x = torch.randn(1, 4, size, size, generator=g).expand(3, -1, -1, -1)
    eps = pipe.unet(x, torch.tensor([500] * 3), ctx).sample
    rel = (eps[0] - eps[1]).norm() / eps[0].norm()
    rel_uncond = (eps[0] - eps[2]).norm() / eps[0].norm()
    assert rel > 0.05 and rel_uncond > 0.05, (float(rel), float(rel_uncond))
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not SD's default
