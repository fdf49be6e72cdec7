"""The toy pipeline builds, saves without pickles, reloads offline and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from blockctl.toy.model import TINY, TOY, bpe_merges, build_pipeline, save_pipeline
from blockctl.toy.vocab import world_words


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    save_pipeline(build_pipeline(TINY, seed=0), out)
    return out


def test_save_is_safetensors_only(tiny_dir: Path) -> None:
    files = {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()}
    assert "model_index.json" in files
    assert {"unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]


def test_reload_and_run_unet(tiny_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    names = [n for n, _ in pipe.unet.named_modules()]
    for part in (
        "attn1.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn1.to_out.0",
        "mid_block.attentions",
    ):
        assert any(part in n for n in names), part
    assert any(n.endswith("self_attn.q_proj") for n, _ in pipe.text_encoder.named_modules())
    ids = pipe.tokenizer(
        ["a red circle", ""], padding="max_length", max_length=TINY.max_tokens, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        x = torch.randn(2, TINY.latent_channels, TINY.latent_size, TINY.latent_size)
        eps = pipe.unet(x, torch.tensor([10, 500]), ctx).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_deterministic_by_seed() -> None:
    a, b = build_pipeline(TINY, seed=3), build_pipeline(TINY, seed=3)
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_fp16_save_keeps_caller_dtype(tmp_path: Path) -> None:
    pipe = build_pipeline(TINY)
    save_pipeline(pipe, tmp_path, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float32
    cfg = json.loads((tmp_path / "model_index.json").read_text())
    assert cfg["_class_name"] == "StableDiffusionPipeline"


def test_world_words_are_single_tokens_and_added_tokens_work() -> None:
    tok = build_pipeline(TOY).tokenizer
    for w in world_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    assert len(tok.tokenize("zebra")) > 1  # unknown words fall back to characters
    tok.add_tokens(["<rex>"])
    assert "<rex>" in tok.tokenize("a photo of <rex> star")


def test_merges_resolve_every_word() -> None:
    words = ("red", "green", "greed", "reed", "ring", "striped", "stripe")
    merges = bpe_merges(words)
    assert len(merges) >= len(words)
