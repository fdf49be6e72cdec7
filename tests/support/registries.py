"""Registries with published adapters, for the merge, verify and interop tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blockctl.layout import sha256_file
from registry import Registry
from tests.conftest import create_registry, write_random_adapter

CONCEPTS = ("rex", "tabby", "vangogh")


def make_published(
    root: Path,
    base: Path,
    concepts: Sequence[str] = CONCEPTS,
    *,
    text_encoder: bool = True,
    preset: str = "cross-kv",
) -> Registry:
    """A registry on ``base`` with every concept reserved and a random adapter published."""
    root.mkdir(parents=True, exist_ok=True)
    reg = create_registry(root / "reg", base, text_encoder=text_encoder, preset=preset)
    for i, concept in enumerate(concepts):
        reg.reserve(concept, f"<{concept}>", "thing", "tester")
        path = write_random_adapter(reg, concept, root / f"{concept}.safetensors", seed=i + 1)
        reg.publish(concept, path, sha256_file(path))
    return reg
