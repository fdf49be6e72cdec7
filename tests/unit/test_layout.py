"""Layout from a base folder: presets, fingerprint, basis, hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockctl.base_model import BaseFolder, resolve_base
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import Layout, build_layout, find_targets, fingerprint, load_basis


def test_presets_select_the_documented_modules(tiny_base: Path) -> None:
    base = BaseFolder(tiny_base)
    cross = find_targets(base, "cross-kv", text_encoder=False)
    attn = find_targets(base, "attn", text_encoder=False)
    with_te = find_targets(base, "cross-kv", text_encoder=True)
    assert cross and all(".attn2.to_k" in t.name or ".attn2.to_v" in t.name for t in cross)
    assert {t.name.rsplit(".", 1)[-1] for t in attn} == {"to_q", "to_k", "to_v", "0"}
    assert len(attn) == 4 * len(cross)  # attn1+attn2 × q,k,v,out vs attn2 × k,v
    te = [t for t in with_te if t.component == "text_encoder"]
    assert {t.module.rsplit(".", 1)[-1] for t in te} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    # cross-attention K/V read text tokens: their input width is the text encoder's width
    assert {t.in_features for t in cross} == {32}


def test_unknown_preset_is_invalid_input(tiny_base: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown target preset"):
        find_targets(BaseFolder(tiny_base), "mlp", text_encoder=False)


def test_layout_roundtrip_and_hash(tiny_base: Path, tmp_path: Path) -> None:
    layout = build_layout(str(tiny_base), tiny_base, slots=8, rank=4, basis_path=tmp_path / "b.st")
    again = Layout.from_dict(layout.to_dict())
    assert again == layout and again.layout_hash == layout.layout_hash
    moved = Layout.from_dict({**layout.to_dict(), "base": "/elsewhere"})
    assert moved.layout_hash == layout.layout_hash  # where the base lives is not identity
    tampered = {**layout.to_dict(), "rank": 2}
    with pytest.raises(ValidationFailed):
        Layout.from_dict(tampered)
    with pytest.raises(InvalidInput, match="newer"):
        Layout.from_dict({**layout.to_dict(), "schema_version": 99})


def test_basis_file_has_one_orthonormal_matrix_per_width(tiny_base: Path, tmp_path: Path) -> None:
    path = tmp_path / "basis.safetensors"
    layout = build_layout(
        str(tiny_base), tiny_base, preset="attn", slots=4, rank=2, basis_path=path
    )
    assert sorted(load_file(str(path))) == [f"basis.{d}" for d in layout.widths]
    bases = load_basis(path, layout)
    for d, b in bases.items():
        assert torch.allclose(b.T @ b, torch.eye(d), atol=1e-5)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValidationFailed, match="sha256"):
        load_basis(path, layout)


def test_capacity_is_checked(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="narrowest target"):
        build_layout(str(tiny_base), tiny_base, slots=9, rank=4, basis_path=tmp_path / "b")


def test_fingerprint_changes_with_weights(tiny_base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    file = other / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(file))
    targets = find_targets(BaseFolder(tiny_base), "cross-kv", text_encoder=False)
    assert fingerprint(BaseFolder(tiny_base), targets) != fingerprint(BaseFolder(other), targets)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidInput, match="safetensors only"):
        BaseFolder(resolve_base(str(tmp_path))).weight_files("unet")


def test_resolve_base_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a diffusers pipeline folder"):
        resolve_base(str(tmp_path))
    with pytest.raises(InvalidInput, match="neither"):
        resolve_base("no such thing at all")
