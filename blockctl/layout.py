"""The layout: which modules of which base carry slots, how many slots of what rank, and the
basis they are cut from. Fixed when a registry is created; every adapter is checked against it.

Reading a layout needs no torch (``blockctl slots`` starts in a fraction of a second); the
functions that draw, store or load tensors import it when called.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blockctl.base_model import BaseFolder
from blockctl.clip_names import canonical_module
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.family import SD, Family, family_named, family_of_pipeline

if TYPE_CHECKING:
    import torch

# 2: the model family (SD or SDXL) and the second text encoder's token width.
SCHEMA_VERSION = 2
TOKEN_EMBEDDING_KEY = "embeddings.token_embedding.weight"

# Target presets (docs/design.md §2). Patterns match weight keys without ".weight".
_UNET_ATTN = re.compile(r"^(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_CROSS_KV = re.compile(r"^(.*\.attn2)\.(to_k|to_v)$")
_TEXT_ATTN = re.compile(r"^(encoder\.layers\.\d+\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)$")
Preset = Literal["cross-kv", "attn"]
PRESETS: dict[Preset, re.Pattern[str]] = {"cross-kv": _UNET_CROSS_KV, "attn": _UNET_ATTN}
DEFAULT_PRESET: Preset = "cross-kv"
# Where the base came from is informational: moving a base folder keeps the layout.
_UNHASHED = ("base",)
# Fields added after schema 1, with the schema that added them: an older layout's hash never
# covered them, so they are hashed only from that schema on (old registries stay valid).
_ADDED_IN = {"family": 2, "token_dim_2": 2}


@dataclass(frozen=True)
class Target:
    """One Linear layer carrying slots, e.g. ``unet.mid_block…attn2.to_k``."""

    name: str
    in_features: int
    out_features: int

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def module(self) -> str:
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class Layout:
    base: str
    base_fingerprint: str
    preset: str
    text_encoder: bool
    targets: tuple[Target, ...]
    rank: int
    slots: int
    scale: float
    token_dim: int
    basis_seed: int
    basis_sha256: str
    family: str = SD.name  # layouts before schema 2 are all SD 1.x/2.x
    token_dim_2: int | None = None  # the second text encoder's token width (SDXL)
    schema_version: int = SCHEMA_VERSION

    @property
    def widths(self) -> list[int]:
        return sorted({t.in_features for t in self.targets})

    @property
    def model_family(self) -> Family:
        return family_named(self.family)

    @property
    def token_dims(self) -> dict[str, int]:
        """Token-embedding width of each text encoder, by diffusers component."""
        widths = (self.token_dim, self.token_dim_2)
        return {
            encoder: int(w)
            for encoder, w in zip(self.model_family.text_encoders, widths, strict=False)
            if w is not None
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [asdict(t) for t in self.targets]
        data["layout_hash"] = self.layout_hash
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        version = int(data.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise InvalidInput(
                f"layout schema {version} is newer than this blockctl understands "
                f"({SCHEMA_VERSION}); upgrade blockctl"
            )
        fields = {k: v for k, v in data.items() if k not in ("layout_hash", "targets")}
        fields.setdefault("schema_version", 1)  # what a record without one was written as
        layout = cls(targets=tuple(Target(**t) for t in data["targets"]), **fields)
        family_named(layout.family)  # a family this blockctl does not know fails here
        stored = data.get("layout_hash")
        if stored is not None and stored != layout.layout_hash:
            raise ValidationFailed("layout record is damaged: its hash does not match its content")
        return layout

    @property
    def layout_hash(self) -> str:
        data = asdict(self)
        for key in _UNHASHED:
            data.pop(key)
        for key, since in _ADDED_IN.items():
            if self.schema_version < since:
                data.pop(key)
        data["targets"] = [asdict(t) for t in self.targets]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def find_targets(
    base: BaseFolder, preset: str, text_encoder: bool, family: Family = SD
) -> tuple[Target, ...]:
    """Every Linear weight of the base that the preset selects, sorted by name; with
    ``text_encoder``, the attention projections of every text encoder of the family."""
    if preset not in PRESETS:
        raise InvalidInput(f"unknown target preset {preset!r}; choose one of {sorted(PRESETS)}")
    found = _match(base, "unet", PRESETS[preset])
    if text_encoder:
        for encoder in family.text_encoders:
            found += _match(base, encoder, _TEXT_ATTN)
    if not found:
        raise InvalidInput(f"the base has no modules matching preset {preset!r}")
    return tuple(sorted(found, key=lambda t: t.name))


def _match(base: BaseFolder, component: str, pattern: re.Pattern[str]) -> list[Target]:
    out = []
    for key, info in base.tensors(component).items():
        if not key.endswith(".weight") or len(info.shape) != 2:
            continue
        module = canonical_module(key[: -len(".weight")])
        if pattern.match(module):
            out.append(Target(f"{component}.{module}", info.shape[1], info.shape[0]))
    return out


def fingerprint(base: BaseFolder, targets: tuple[Target, ...]) -> str:
    """sha256 over the targets' names, shapes and float32 weight bytes, so an adapter trained
    for one base is refused by another, even one with the same architecture."""
    digest = hashlib.sha256()
    for t in sorted(targets, key=lambda t: t.name):
        weight = base.read(t.component, f"{t.module}.weight").float().contiguous()
        digest.update(f"{t.name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def token_dim(base: BaseFolder, encoder: str = "text_encoder") -> int:
    try:
        info = base.info(encoder, TOKEN_EMBEDDING_KEY)
    except ValidationFailed:
        raise InvalidInput(
            f"the base's {encoder} has no token embedding (not a CLIP model?)"
        ) from None
    return int(info.shape[1])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def basis_key(width: int) -> str:
    return f"basis.{width}"


def write_basis(bases: dict[int, torch.Tensor], path: Path) -> str:
    from safetensors.torch import save_file

    save_file({basis_key(d): b.contiguous() for d, b in bases.items()}, str(path))
    return sha256_file(path)


def build_layout(
    base_spec: str,
    base_dir: Path,
    *,
    preset: str = DEFAULT_PRESET,
    text_encoder: bool = False,
    slots: int = 16,
    rank: int = 4,
    scale: float = 1.0,
    seed: int = 0,
    basis_path: Path,
) -> Layout:
    """Inspect the base, check capacity, draw and write the basis, return the layout."""
    from blockctl import blocks

    base = BaseFolder(base_dir)
    family = family_of_pipeline(base.pipeline_class())  # anything else stops here, at init
    targets = find_targets(base, preset, text_encoder, family)
    try:
        blocks.check_capacity(slots, rank, [t.in_features for t in targets])
    except blocks.LayoutError as exc:
        raise InvalidInput(str(exc)) from exc
    if not scale > 0:
        raise InvalidInput(f"scale must be positive, got {scale}")
    bases = blocks.make_bases([t.in_features for t in targets], seed)
    basis_sha = write_basis(bases, basis_path)
    return Layout(
        base=base_spec,
        base_fingerprint=fingerprint(base, targets),
        preset=preset,
        text_encoder=text_encoder,
        targets=targets,
        rank=rank,
        slots=slots,
        scale=scale,
        token_dim=token_dim(base, family.text_encoders[0]),
        token_dim_2=token_dim(base, family.text_encoders[1]) if family.dual_text else None,
        basis_seed=seed,
        basis_sha256=basis_sha,
        family=family.name,
    )


def load_basis(path: Path, layout: Layout) -> dict[int, torch.Tensor]:
    """The stored bases, checked against the layout's sha256 and widths."""
    from safetensors.torch import load_file

    if sha256_file(path) != layout.basis_sha256:
        raise ValidationFailed(f"{path} does not match the layout's basis sha256 (damaged?)")
    tensors = load_file(str(path))
    out = {}
    for d in layout.widths:
        b = tensors.get(basis_key(d))
        if b is None or tuple(b.shape) != (d, d):
            raise ValidationFailed(f"basis file lacks a {d}×{d} basis")
        out[d] = b
    return out


def layout_of(registry: Any) -> Layout:
    """The registry's layout as a ``Layout``; a damaged or too-new record is a registry fault."""
    from blockctl.errors import BlockctlError, RegistryUnavailable

    try:
        return Layout.from_dict(registry.layout())
    except BlockctlError as exc:
        raise RegistryUnavailable(f"registry {registry.location}: {exc.message}") from exc
    except (KeyError, TypeError) as exc:
        raise RegistryUnavailable(f"registry {registry.location}: malformed layout record") from exc
