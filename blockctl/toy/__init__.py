"""The embedded default base: a small SD-architecture pipeline pretrained on a procedural world."""

from __future__ import annotations

from pathlib import Path


def weights_path() -> Path:
    """The shipped pretrained toy pipeline (a diffusers folder, safetensors fp16)."""
    return Path(__file__).resolve().parent / "weights"
