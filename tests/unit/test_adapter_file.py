"""The adapter file: round trip, and refusal of malformed files with a reason."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from blockctl.adapter import AdapterMeta, load_adapter, payload_sha256, write_adapter
from blockctl.errors import ValidationFailed
from blockctl.safetensors_io import read_header

META = AdapterMeta(
    concept="rex", slot=3, tokens=("<rex>",), class_word="dog", rank=2, scale=1.0,
    layout_hash="L" * 64, base_fingerprint="F" * 64, training={"steps": 10},
)  # fmt: skip


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "unet.a.attn2.to_k.lora_B.weight": torch.randn(8, 2, generator=gen),
        "token_embedding.<rex>": torch.randn(1, 4, generator=gen),
    }


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "rex.safetensors"
    sha = write_adapter(path, tensors(), META)
    adapter = load_adapter(path)
    assert adapter.meta == META
    assert adapter.payload_sha256 == sha == payload_sha256(adapter.tensors)
    assert not list(tmp_path.glob(".*tmp"))


def test_payload_hash_ignores_insertion_order() -> None:
    t = tensors()
    assert payload_sha256(t) == payload_sha256(dict(reversed(list(t.items()))))


def _write(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    return path


def _header_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "too short"),
        (b"hello", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "header claims"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (_header_bytes({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
         "lies about the size"),
        (_header_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),
         "trailing bytes"),
        (_header_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
         "truncated"),
        (_header_bytes({"x": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
         "malformed header"),
    ],
)  # fmt: skip
def test_malformed_files_are_refused(tmp_path: Path, raw: bytes, reason: str) -> None:
    with pytest.raises(ValidationFailed, match=reason):
        read_header(_write(tmp_path, raw))


def test_plain_safetensors_is_not_an_adapter(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValidationFailed, match="not a blockctl adapter"):
        load_adapter(path)


def test_metadata_missing_field(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "partial.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "blockctl.adapter/1"})
    with pytest.raises(ValidationFailed, match="lacks"):
        load_adapter(path)
