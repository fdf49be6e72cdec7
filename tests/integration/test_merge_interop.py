"""Merge outputs loaded by the real clients: diffusers from_pretrained, from_single_file,
load_lora_weights (peft keys and, through diffusers' kohya converter, kohya keys), and the
concept embeddings beside a single file or LoRA through load_textual_inversion, each file as it
is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blockctl.adapter import load_adapter, token_key
from blockctl.merge import MergeOptions, merge
from blockctl.merge.embeddings import embeddings_dir
from registry import Registry, open_registry
from tests.support.generation import generate
from tests.support.registries import make_published

pytest.importorskip("peft")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)

CONCEPTS = ["rex", "tabby"]


@pytest.fixture(scope="module")
def merged(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    reg: Registry = make_published(root, tiny_base)
    outs = {
        "folder": root / "merged",
        "single": root / "merged.safetensors",
        "lora": root / "lora.safetensors",
        "kohya": root / "kohya.safetensors",
    }
    scales = {"rex": 0.8}
    merge(reg, CONCEPTS, MergeOptions(out=outs["folder"], scales=scales))
    merge(reg, CONCEPTS, MergeOptions(out=outs["single"], format="single-file", scales=scales))
    merge(
        reg,
        CONCEPTS,
        MergeOptions(out=outs["lora"], format="lora", lora_keys="peft", scales=scales),
    )
    # The default key style, kohya: what diffusers, ComfyUI and AUTOMATIC1111 all read.
    merge(reg, CONCEPTS, MergeOptions(out=outs["kohya"], format="lora", scales=scales))
    return outs | {"base": tiny_base, "reg": Path(reg.location)}


def _embedding_files(out: Path) -> tuple[list[str], list[str]]:
    """The concept embeddings beside ``out`` and the tokens to load them as."""
    folder = embeddings_dir(out)
    return [str(folder / f"{c}.safetensors") for c in CONCEPTS], [f"<{c}>" for c in CONCEPTS]


def _load(path: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        str(path), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="module")
def folder_pipe(merged: dict[str, Path]) -> StableDiffusionPipeline:
    return _load(merged["folder"])


def _load_single_file(merged: dict[str, Path]) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_single_file(
        str(merged["single"]),
        config=str(merged["base"]),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )


def _unet_out(pipe: StableDiffusionPipeline) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


def _text_out(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_from_pretrained_loads_and_generates(folder_pipe: StableDiffusionPipeline) -> None:
    ids = folder_pipe.tokenizer("a <rex> and <tabby>").input_ids
    vocab = folder_pipe.text_encoder.get_input_embeddings().weight.shape[0]
    assert vocab - 2 in ids and vocab - 1 in ids
    generate(folder_pipe, "a photo of <rex>", 32)


def test_from_single_file_equals_the_folder(
    merged: dict[str, Path], folder_pipe: StableDiffusionPipeline
) -> None:
    pipe = _load_single_file(merged)
    for name in ("unet", "vae"):
        mine, theirs = getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    pipe.load_textual_inversion(*_embedding_files(merged["single"]))
    prompt = "a <rex> with <tabby>"
    assert torch.allclose(_text_out(pipe, prompt), _text_out(folder_pipe, prompt), atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "kohya"])
def test_lora_on_the_base_matches_the_folder(
    merged: dict[str, Path], folder_pipe: StableDiffusionPipeline, kind: str
) -> None:
    base = _load(merged["base"])
    before = _unet_out(base)
    base.load_lora_weights(str(merged[kind]))  # kohya keys go through diffusers' converter
    after, want = _unet_out(base), _unet_out(folder_pipe)
    assert (after - want).abs().max() <= 1e-4
    assert (before - want).abs().max() > 1e-3  # the LoRA really changed something
    base.load_textual_inversion(*_embedding_files(merged[kind]))
    prompt = "a <tabby>"
    assert torch.allclose(_text_out(base, prompt), _text_out(folder_pipe, prompt), atol=1e-4)


def test_default_lora_fused_by_diffusers_equals_the_folder(
    merged: dict[str, Path], folder_pipe: StableDiffusionPipeline
) -> None:
    with safe_open(str(merged["kohya"]), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)  # the text encoder carries slots too
    base = _load(merged["base"])
    pipe = _load(merged["base"])
    pipe.load_lora_weights(str(merged["kohya"]))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    for name in ("unet", "text_encoder"):
        want, got = getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        before = getattr(base, name).state_dict()
        assert got.keys() == before.keys(), name
        changed = 0
        for key, value in got.items():
            if key.endswith("token_embedding.weight"):  # the folder also has the concept rows
                continue
            assert torch.allclose(value, want[key], atol=1e-5), (name, key)
            changed += not torch.equal(value, before[key])
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[name]
        targets = sum(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in keys)
        assert changed == targets > 0, name  # every target moved, nothing else did


@pytest.mark.parametrize("kind", ["single", "lora", "kohya"])
def test_each_concept_embedding_loads_as_it_is(merged: dict[str, Path], kind: str) -> None:
    """What a diffusers user does with a single file or a LoRA: load each concept's file with
    ``load_textual_inversion(file, token=...)``; the row is the adapter's, the prompt's token
    is that one id, and the pipeline generates."""
    if kind == "single":
        pipe = _load_single_file(merged)
    else:
        pipe = _load(merged["base"])
        pipe.load_lora_weights(str(merged[kind]))
    reg = open_registry(str(merged["reg"]))
    for concept, file, token in zip(CONCEPTS, *_embedding_files(merged[kind]), strict=True):
        pipe.load_textual_inversion(file, token=token)
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert pipe.tokenizer(f"a photo of {token} thing").input_ids.count(token_id) == 1
        table = pipe.text_encoder.get_input_embeddings().weight
        row = load_adapter(reg.adapter_file(concept)).tensors[token_key(token)]
        assert torch.equal(table[token_id], row[0].to(table.dtype))
    generate(pipe, "a photo of <rex> with <tabby>", 32)
