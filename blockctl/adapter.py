"""The adapter file: one safetensors file per concept, self-describing (docs/design.md §6).

Tensors: ``{target}.lora_B.weight`` (out×r) per target, ``token_embedding.{token}`` (1×dim) per
token for the (first) text encoder and, on SDXL, ``token_embedding_2.{token}`` for
``text_encoder_2``. ``A`` is implicit (slot + basis) and not stored. Metadata: format, layout
hash, base fingerprint, slot, concept, tokens, class word, rank, scale, which text encoder each
token-embedding key belongs to (``token_embeddings``), training settings, and the sha256 of the
tensor payload.

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
TEXT_ENCODER = "text_encoder"


def up_key(target: str) -> str:
    return f"{target}{UP_SUFFIX}"


def token_stem(encoder: str = TEXT_ENCODER) -> str:
    """``text_encoder`` → ``token_embedding``, ``text_encoder_2`` → ``token_embedding_2``: the
    first keeps the name SD 1.x adapters always had."""
    if not encoder.startswith(TEXT_ENCODER):
        raise ValueError(f"{encoder!r} is not a text encoder component")
    return "token_embedding" + encoder[len(TEXT_ENCODER) :]


def token_key(token: str, encoder: str = TEXT_ENCODER) -> str:
    return f"{token_stem(encoder)}.{token}"


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
    # The text encoders holding a row per token, in the family's order (``Family.text``).
    text_encoders: tuple[str, ...] = (TEXT_ENCODER,)

    def to_header(self, payload_sha256: str) -> dict[str, str]:
        embeddings = {token_stem(e): e for e in self.text_encoders}
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
            "token_embeddings": json.dumps(embeddings, sort_keys=True),
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
                text_encoders=_text_encoders(header),
            )
            return meta, header["payload_sha256"]
        except KeyError as exc:
            raise ValidationFailed(f"adapter metadata lacks {exc.args[0]!r}") from exc
        except (ValueError, TypeError) as exc:
            raise ValidationFailed(f"adapter metadata is malformed: {exc}") from exc


def _text_encoders(header: Mapping[str, str]) -> tuple[str, ...]:
    """From ``token_embeddings`` ({key stem: component}); files from before it have one."""
    raw = header.get("token_embeddings")
    if raw is None:
        return (TEXT_ENCODER,)
    mapping = json.loads(raw)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError("token_embeddings is not a mapping of key stems to text encoders")
    encoders = tuple(sorted(str(e) for e in mapping.values()))
    if any(token_stem(e) != stem for stem, e in mapping.items()):
        raise ValueError(f"token_embeddings {mapping} pairs a key stem with another encoder")
    return encoders


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
