"""The adapter file: one safetensors file per concept, self-describing (DESIGN section 6).

Tensors: ``{target}.lora_B.weight`` (out×r) per target, ``token_embedding.{token}`` (1×dim) per
token. ``A`` is implicit (slot + basis) and not stored. Metadata: format, layout hash, base
fingerprint, slot, concept, tokens, class word, rank, scale, training settings, and the
sha256 of the tensor payload.

Files are pre-checked byte by byte (``safetensors_io.read_header``) before safetensors parses
them, so a truncated file, a header that lies about sizes or a huge header is refused with a
reason instead of a crash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blockctl.errors import ValidationFailed
from blockctl.safetensors_io import read_header, save_file_atomic

FORMAT = "blockctl.adapter/1"
UP_SUFFIX = ".lora_B.weight"
TOKEN_PREFIX = "token_embedding."


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
    save_file_atomic(clean, path, meta.to_header(sha))
    return sha


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
