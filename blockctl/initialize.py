"""Creating a registry: inspect the base, draw the basis, store both."""

from __future__ import annotations

import tempfile
from pathlib import Path

from blockctl.base_model import resolve_base
from blockctl.errors import InvalidInput
from blockctl.layout import DEFAULT_PRESET, Layout, build_layout
from registry.base import Registry


def init_registry(
    registry: Registry,
    base: str,
    *,
    preset: str = DEFAULT_PRESET,
    text_encoder: bool = False,
    slots: int = 16,
    rank: int = 4,
    scale: float = 1.0,
    seed: int = 0,
) -> Layout:
    """Bind a new registry to ``base`` and a slot layout; refuses an existing registry."""
    if registry.exists():  # fail before the slow part; create() enforces it again
        raise InvalidInput(f"a registry already exists at {registry.location}")
    base_dir = resolve_base(base)
    with tempfile.TemporaryDirectory(prefix="blockctl-init-") as tmp:
        basis_file = Path(tmp) / "basis.safetensors"
        layout = build_layout(
            base,
            base_dir,
            preset=preset,
            text_encoder=text_encoder,
            slots=slots,
            rank=rank,
            scale=scale,
            seed=seed,
            basis_path=basis_file,
        )
        registry.create(layout.to_dict(), basis_file)
    return layout
