"""Shared fixtures: a tiny SD pipeline built in-process, registries on it, adapters in them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blockctl.adapter import AdapterMeta, token_key, up_key, write_adapter
from blockctl.initialize import init_registry
from blockctl.layout import Layout, layout_of
from registry import Registry, open_registry

pytest_plugins = ["tests.support.hub_fixtures"]  # the test Hub: ``hub_server``, ``hub``

# What the caller's environment must not decide (a test may still set them)
_CALLER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")  # fmt: skip


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own HF_HOME, XDG data/cache homes and blockctl cache, and none of
    the caller's Hub settings or BLOCKCTL_* variables; huggingface_hub read some of them at
    import, so its constants are reset too."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("env")
    for name in [*_CALLER_ENV, *(k for k in os.environ if k.startswith("BLOCKCTL_"))]:
        monkeypatch.delenv(name, raising=False)
    for name, sub in (("HF_HOME", "hf"), ("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"),
                      ("BLOCKCTL_CACHE_DIR", "blockctl-cache")):  # fmt: skip
        monkeypatch.setenv(name, str(home / sub))
    endpoint = constants._HF_DEFAULT_ENDPOINT
    for attr, value in {
        "HF_HUB_OFFLINE": False, "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home / "hf"), "HF_HUB_CACHE": str(home / "hf" / "hub"),
        "HF_TOKEN_PATH": str(home / "hf" / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "hf" / "stored_tokens"),
    }.items():  # fmt: skip
        monkeypatch.setattr(constants, attr, value)


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
