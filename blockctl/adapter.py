"""The adapter file: one safetensors file per concept, self-describing (DESIGN section 6).

Tensors: ``{target}.lora_B.weight`` (out×r) per target, ``token_embedding.{token}`` (1×dim) per
token. ``A`` is implicit (slot + basis) and not stored. Metadata: format, layout hash, base
fingerprint, slot, concept, tokens, class word, rank, scale, training settings, and the
sha256 of the tensor payload.

Files are pre-checked byte by byte before safetensors parses them, so a truncated file, a
header that lies about sizes or a huge header is refused with a reason instead of a crash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blockctl.errors import ValidationFailed

FORMAT = "blockctl.adapter/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
UP_SUFFIX = ".lora_B.weight"
TOKEN_PREFIX = "token_embedding."
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def up_key(target: str) -> str:
    return f"{target}{UP_SUFFIX}"


def token_key(token: str) -> str:
    return f"{TOKEN_PREFIX}{token}"


@dataclass(frozen=True)
class AdapterMeta:
    concept: str
    slot: int
    tokens: tuple[str, ...]
    class_word: str
    rank: int
    scale: float
    layout_hash: str
    base_fingerprint: str
    training: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_header(self, payload_sha256: str) -> dict[str, str]:
        return {
            "format": self.format,
            "concept": self.concept,
            "slot": str(self.slot),
            "tokens": json.dumps(list(self.tokens)),
            "class_word": self.class_word,
            "rank": str(self.rank),
            "scale": repr(float(self.scale)),
            "layout_hash": self.layout_hash,
            "base_fingerprint": self.base_fingerprint,
            "training": json.dumps(dict(self.training), sort_keys=True),
            "payload_sha256": payload_sha256,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, str]) -> tuple[AdapterMeta, str]:
        """The metadata and the payload sha256 it claims."""
        try:
            meta = cls(
                concept=header["concept"],
                slot=int(header["slot"]),
                tokens=tuple(json.loads(header["tokens"])),
                class_word=header["class_word"],
                rank=int(header["rank"]),
                scale=float(header["scale"]),
                layout_hash=header["layout_hash"],
                base_fingerprint=header["base_fingerprint"],
                training=json.loads(header.get("training", "{}")),
                format=header["format"],
            )
            return meta, header["payload_sha256"]
        except KeyError as exc:
            raise ValidationFailed(f"adapter metadata lacks {exc.args[0]!r}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationFailed(f"adapter metadata is malformed: {exc}") from exc


@dataclass(frozen=True)
class Adapter:
    meta: AdapterMeta
    tensors: Mapping[str, torch.Tensor]
    payload_sha256: str  # as claimed by the file

    def up(self, target: str) -> torch.Tensor:
        return self.tensors[up_key(target)]


def payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and bytes, in key order: independent of how the
    file's header happens to be laid out."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_adapter(path: Path, tensors: Mapping[str, torch.Tensor], meta: AdapterMeta) -> str:
    """Write atomically (temporary sibling, then rename). Returns the payload sha256."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    sha = payload_sha256(clean)
    atomic_save(clean, path, meta.to_header(sha))
    return sha


def atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValidationFailed(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise ValidationFailed(
                    f"{path.name}: not a safetensors file, or a hostile one: header claims "
                    f"{n} bytes (limit {MAX_HEADER_BYTES})"
                )
            if 8 + n > size:
                raise ValidationFailed(f"{path.name}: truncated (header runs past end of file)")
            raw = fh.read(n)
    except OSError as exc:
        raise ValidationFailed(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationFailed(f"{path.name}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ValidationFailed(f"{path.name}: not a safetensors file (header is not an object)")
    _check_offsets(path.name, header, size - 8 - n)
    return header


def _check_offsets(name: str, header: dict[str, Any], data_len: int) -> None:
    spans = []
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    ends = [v.get("data_offsets", [0, 0])[1] for v in entries.values() if isinstance(v, dict)]
    if ends and all(isinstance(e, int) for e in ends) and max(ends) > data_len:
        raise ValidationFailed(
            f"{name}: truncated (tensor data needs {max(ends)} bytes, file has {data_len})"
        )
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValidationFailed(f"{name}: metadata must map strings to strings")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            width = _DTYPE_BYTES[dtype]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationFailed(f"{name}: malformed header entry for {key!r}") from exc
        if not (0 <= start <= end <= data_len) or end - start != count * width:
            raise ValidationFailed(
                f"{name}: header lies about the size of {key!r} "
                f"({end - start} bytes for {dtype}{list(shape)}, data section {data_len})"
            )
        spans.append((start, end))
    spans.sort()
    cursor = 0
    for start, end in spans:
        if start != cursor:
            raise ValidationFailed(f"{name}: tensor data overlaps or leaves gaps")
        cursor = end
    if cursor != data_len:
        raise ValidationFailed(f"{name}: {data_len - cursor} trailing bytes after tensor data")


def load_adapter(path: Path) -> Adapter:
    """Read an adapter file; ValidationFailed with a reason for anything malformed."""
    if not path.is_file():
        raise ValidationFailed(f"{path}: no such file")
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ValidationFailed(
            f"{path.name}: not a blockctl adapter (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    meta, claimed = AdapterMeta.from_header(metadata)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValidationFailed(f"{path.name}: unreadable tensors: {exc}") from exc
    return Adapter(meta=meta, tensors=tensors, payload_sha256=claimed)
