"""Shared fixtures: a tiny SD pipeline built in-process, registries on it, adapters in them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blockctl.adapter import AdapterMeta, token_key, up_key, write_adapter
from blockctl.initialize import init_registry
from blockctl.layout import Layout, layout_of
from registry import Registry, open_registry


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD pipeline folder (random weights, char-level tokenizer)."""
    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    path = tmp_path_factory.mktemp("tiny-base") / "pipe"
    save_pipeline(build_pipeline(TINY, seed=0), path)
    return path


def create_registry(
    location: Path, base: Path, *, slots: int = 4, rank: int = 2, preset: str = "cross-kv",
    text_encoder: bool = False,
) -> Registry:  # fmt: skip
    reg = open_registry(str(location))
    init_registry(reg, str(base), slots=slots, rank=rank, preset=preset, text_encoder=text_encoder)
    return reg


@pytest.fixture
def tiny_registry(tiny_base: Path, tmp_path: Path) -> Registry:
    return create_registry(tmp_path / "reg", tiny_base)


AdapterFactory = Callable[..., Path]


def write_random_adapter(
    reg: Registry, concept: str, path: Path, *, seed: int = 0, magnitude: float = 0.05,
    slot: int | None = None, tokens: tuple[str, ...] | None = None,
) -> Path:  # fmt: skip
    """An adapter with random B blocks for ``concept``'s reserved slot."""
    layout: Layout = layout_of(reg)
    rec = reg.slot_for(concept)
    gen = torch.Generator().manual_seed(seed)
    toks = tokens if tokens is not None else (rec.token,)
    tensors = {
        up_key(t.name): magnitude * torch.randn(t.out_features, layout.rank, generator=gen)
        for t in layout.targets
    }
    for tok in toks:
        tensors[token_key(tok)] = 0.02 * torch.randn(1, layout.token_dim, generator=gen)
    meta = AdapterMeta(
        concept=concept, slot=rec.slot if slot is None else slot, tokens=toks,
        class_word=rec.class_word, rank=layout.rank, scale=layout.scale,
        layout_hash=layout.layout_hash, base_fingerprint=layout.base_fingerprint,
        training={"kind": "random", "seed": seed},
    )  # fmt: skip
    write_adapter(path, tensors, meta)
    return path


@pytest.fixture
def adapter_factory(tmp_path: Path) -> AdapterFactory:
    """``factory(reg, concept, **kw)``: reserve (if needed) and write a random adapter file."""

    def make(reg: Registry, concept: str, class_word: str = "thing", **kw: object) -> Path:
        if not any(r.concept == concept for r in reg.slots()):
            reg.reserve(concept, f"<{concept}>", class_word, "tester")
        return write_random_adapter(reg, concept, tmp_path / f"{concept}.safetensors", **kw)  # type: ignore[arg-type]

    return make
