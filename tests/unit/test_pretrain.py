"""The pretraining script runs end to end (a few steps on the TINY spec)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from blockctl.toy.model import TINY
from blockctl.toy.pretrain import PretrainConfig, pretrain


@pytest.mark.slow  # ~10 s of CPU, end to end
def test_pretrain_tiny_runs_and_saves(tmp_path: Path) -> None:
    cfg = PretrainConfig(
        out=tmp_path / "p", vae_steps=2, unet_steps=2, batch=2, measure_n=8, seed=1
    )
    out = pretrain(cfg, spec=TINY)
    vae_cfg = json.loads((out / "vae/config.json").read_text())
    assert vae_cfg["scaling_factor"] > 0 and vae_cfg["scaling_factor"] != 0.18215
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == TINY.text_hidden
    assert not list(out.rglob("*.bin"))
