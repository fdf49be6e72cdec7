"""Planning a merge (docs/design.md §8): the request checked against the registry and
everything the writers need loaded, nothing written yet.

``plan_merge`` loads the selected adapters' B blocks (small: rank × out per target). The output
writers (one module per format in this package) then stream the base tensor by tensor through
``MergePlan.produce``: ``W' = W + Σ_s scale_s·B_s A_s`` as one float32 matmul per target, cast
at the end to the output dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from blockctl import blocks
from blockctl.adapter import TEXT_ENCODER, load_adapter, token_key
from blockctl.base_model import BaseFolder, resolve_base
from blockctl.clip_names import canonical_module
from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import (
    TOKEN_EMBEDDING_KEY,
    Layout,
    Target,
    fingerprint,
    layout_of,
    load_basis,
    sha256_file,
)
from blockctl.merge.choices import DEFAULT_FORMAT, DEFAULT_LORA_KEYS, FORMATS, LORA_KEYS
from blockctl.merge.record import MERGE_FORMAT, META_KEY
from blockctl.safetensors_io import Entry
from blockctl.verify import adapter_problems
from registry.base import Registry

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidInput(f"unknown dtype {name!r}; choose float32, float16 or bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_scales(items: Sequence[str]) -> dict[str, float]:
    """``["rex=0.8", …]`` → ``{"rex": 0.8}``; one clear error for anything else."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--scale {item!r} is not NAME=FLOAT")
        try:
            number = float(value)
        except ValueError:
            raise InvalidInput(f"--scale {item!r}: {value!r} is not a number") from None
        if not torch.isfinite(torch.tensor(number)):
            raise InvalidInput(f"--scale {item!r}: the scale must be finite")
        if name in out:
            raise InvalidInput(f"--scale given twice for {name!r}")
        out[name] = number
    return out


@dataclass(frozen=True)
class MergeOptions:
    out: Path
    format: str = DEFAULT_FORMAT
    dtype: str | None = None  # None: every tensor keeps the base's dtype
    scales: Mapping[str, float] = field(default_factory=dict)
    lora_keys: str = DEFAULT_LORA_KEYS
    force: bool = False
    copy: bool = False  # diffusers: copy the files the merge leaves unchanged instead of linking

    def check(self) -> None:
        if self.format not in FORMATS:
            raise InvalidInput(f"unknown format {self.format!r}; choose one of {list(FORMATS)}")
        if self.lora_keys not in LORA_KEYS:
            raise InvalidInput(f"unknown LoRA key style {self.lora_keys!r}; choose {LORA_KEYS}")
        parse_dtype(self.dtype)


@dataclass(frozen=True)
class Selected:
    """One merged concept: where its adapter came from and how strongly it goes in."""

    concept: str
    slot: int
    tokens: tuple[str, ...]
    scale: float  # the user's factor; the layout's scale multiplies it
    sha256: str  # of the adapter file, as the registry records it

    def to_dict(self) -> dict[str, object]:
        return {
            "concept": self.concept,
            "slot": self.slot,
            "tokens": list(self.tokens),
            "scale": self.scale,
            "sha256": self.sha256,
        }


TokenRows = tuple[tuple[str, torch.Tensor], ...]  # (token, 1×dim float32) by slot


@dataclass(frozen=True)
class MergePlan:
    layout: Layout
    base: BaseFolder
    selected: tuple[Selected, ...]  # by slot, so the subset's order never changes the bytes
    ups: Mapping[str, Mapping[int, torch.Tensor]]  # target name -> slot -> B_s
    bases: Mapping[int, torch.Tensor]  # width -> O_d
    # Per text encoder (diffusers component: one on SD, two on SDXL), the concept tokens' rows.
    text_rows: Mapping[str, TokenRows]

    @property
    def token_rows(self) -> TokenRows:
        """The first text encoder's rows (the only ones on SD)."""
        return self.text_rows.get(TEXT_ENCODER, ())

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(tok for tok, _ in self.token_rows)

    def only(self, concept: str) -> MergePlan:
        """The same plan restricted to one of its concepts, without re-reading anything."""
        keep = tuple(s for s in self.selected if s.concept == concept)
        if not keep:
            raise InvalidInput(f"{concept!r} is not part of this merge")
        (sel,) = keep
        return replace(
            self,
            selected=keep,
            ups={t: {sel.slot: by_slot[sel.slot]} for t, by_slot in self.ups.items()},
            text_rows={
                encoder: tuple((tok, row) for tok, row in rows if tok in sel.tokens)
                for encoder, rows in self.text_rows.items()
            },
        )

    @property
    def slot_scales(self) -> dict[int, float]:
        return {s.slot: self.layout.scale * s.scale for s in self.selected}

    def targets(self, component: str) -> Mapping[str, Target]:
        """Canonical weight key (within the component) → target."""
        return self._targets_by_component.get(component, {})

    @cached_property
    def _targets_by_component(self) -> dict[str, dict[str, Target]]:
        # Asked once per streamed tensor: on SDXL's 2,500 tensors, rebuilding it each time
        # cost 0.8 s of a merge. (cached_property writes the instance dict, which a frozen
        # dataclass allows; ``replace`` makes a new instance with an empty cache.)
        out: dict[str, dict[str, Target]] = {}
        for t in self.layout.targets:
            out.setdefault(t.component, {})[f"{t.module}.weight"] = t
        return out

    def token_rows_for(self, component: str, key: str) -> int:
        """How many concept-token rows are appended to this tensor (0 for all but the token
        embeddings of the text encoders)."""
        if canonical_module(key) == TOKEN_EMBEDDING_KEY:
            return len(self.text_rows.get(component, ()))
        return 0

    def delta(self, target: Target) -> torch.Tensor:
        """``Σ_s scale_s·B_s A_s`` (out×d, float32) as one matmul."""
        return blocks.merged_delta(
            self.ups[target.name],
            self.bases[target.in_features],
            self.layout.rank,
            self.slot_scales,
        )

    def lora_factors(self, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the merged LoRA: ``A = [A_s; …]`` (|S|r×d) and
        ``B = [scale_s·B_s | …]`` (out×|S|r), both float32, so ``B @ A`` is the delta."""
        order = [s.slot for s in self.selected]
        scales = self.slot_scales
        down = blocks.stacked_down(self.bases[target.in_features], order, self.layout.rank)
        up = torch.cat([self.ups[target.name][s].float() * scales[s] for s in order], dim=1)
        return down, up

    def record(
        self, output: str, dtype: torch.dtype | None, extra: Mapping[str, object] | None = None
    ) -> dict[str, object]:
        """What went in: enough for ``verify --merged`` to recompute the expected weights.
        ``extra``: what a writer put beside the output (e.g. the concept embeddings)."""
        return {
            "format": MERGE_FORMAT,
            "output": output,
            "layout_hash": self.layout.layout_hash,
            "base_fingerprint": self.layout.base_fingerprint,
            "rank": self.layout.rank,
            "layout_scale": self.layout.scale,
            "dtype": dtype_name(dtype) if dtype is not None else "base",
            "concepts": [s.to_dict() for s in self.selected],
            **(extra or {}),
        }

    def metadata(
        self, output: str, dtype: torch.dtype | None, extra: Mapping[str, object] | None = None
    ) -> dict[str, str]:
        # "format": "pt" is what transformers/diffusers require of safetensors metadata.
        return {
            "format": "pt",
            META_KEY: json.dumps(self.record(output, dtype, extra), sort_keys=True),
        }

    # -- streaming one tensor at a time --------------------------------------------------------
    def out_entry(
        self, component: str, entry: Entry, dtype: torch.dtype | None, *, tokens: bool = True
    ) -> Entry:
        shape = entry.shape
        if tokens:
            shape = (shape[0] + self.token_rows_for(component, entry.key), *shape[1:])
        return Entry(entry.key, _cast_dtype(entry.dtype, dtype), shape)

    def produce(
        self,
        component: str,
        key: str,
        tensor: torch.Tensor,
        dtype: torch.dtype | None,
        *,
        tokens: bool = True,
    ) -> torch.Tensor:
        out_dtype = _cast_dtype(tensor.dtype, dtype)
        target = self.targets(component).get(canonical_module(key))
        if target is not None:
            return blocks.apply_delta(tensor, self.delta(target)).to(out_dtype)
        if tokens and self.token_rows_for(component, key):
            rows = [row.to(torch.float32) for _, row in self.text_rows[component]]
            return torch.cat([tensor.to(torch.float32), *rows], dim=0).to(out_dtype)
        return tensor.to(out_dtype)

    def passthrough(
        self, component: str, entry: Entry, dtype: torch.dtype | None, *, tokens: bool = True
    ) -> bool:
        """Whether the tensor's bytes go out exactly as the base stores them."""
        if canonical_module(entry.key) in self.targets(component):
            return False
        if tokens and self.token_rows_for(component, entry.key):
            return False
        return _cast_dtype(entry.dtype, dtype) == entry.dtype

    def changes(self, component: str) -> bool:
        """Whether any tensor of the component differs from the base (dtype aside)."""
        return bool(self.targets(component)) or bool(self.text_rows.get(component))


def _cast_dtype(current: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    if wanted is None or not current.is_floating_point:
        return current
    return wanted


def check_request(concepts: Sequence[str], scales: Mapping[str, float]) -> None:
    """Each concept named once, and scales (finite) only for concepts being merged."""
    dupes = sorted({c for c in concepts if list(concepts).count(c) > 1})
    if dupes:
        raise InvalidInput(f"concept(s) named more than once: {', '.join(dupes)}")
    stray = sorted(set(scales) - set(concepts))
    if stray:
        raise InvalidInput(f"--scale given for concept(s) not being merged: {', '.join(stray)}")
    odd = sorted(c for c, v in scales.items() if not math.isfinite(v))
    if odd:
        raise InvalidInput(f"the scale of {', '.join(odd)} is not a finite number")


def plan_merge(
    registry: Registry, concepts: Sequence[str], scales: Mapping[str, float]
) -> MergePlan:
    """Check the request and load what the merge needs; nothing is written."""
    if not concepts:
        raise InvalidInput("name at least one concept to merge")
    check_request(concepts, scales)
    layout = layout_of(registry)
    published = {rec.concept: rec for rec in registry.adapters()}
    unknown = [c for c in concepts if c not in published]
    if unknown:
        known = ", ".join(sorted(published)) or "none"
        raise SlotConflict(
            f"not published in this registry: {', '.join(unknown)} (published: {known})"
        )
    records = {r.concept: r for r in registry.slots()}
    selected: list[Selected] = []
    adapters = {}
    for concept in concepts:
        rec = published[concept]
        path = registry.adapter_file(concept)
        if sha256_file(path) != rec.sha256:
            raise ValidationFailed(
                f"the stored adapter of {concept!r} no longer matches the registry's sha256 "
                "(modified or damaged)",
                hint="publish the adapter again, or run 'blockctl verify'",
            )
        adapter = load_adapter(path)
        problems = adapter_problems(adapter, layout, records.get(concept))
        if problems:
            raise ValidationFailed(f"adapter of {concept!r}: " + "; ".join(problems))
        adapters[concept] = adapter
        selected.append(
            Selected(
                concept,
                adapter.meta.slot,
                tuple(adapter.meta.tokens),
                float(scales.get(concept, 1.0)),
                rec.sha256,
            )
        )
    selected.sort(key=lambda s: s.slot)
    ups = {
        t.name: {s.slot: adapters[s.concept].up(t.name).to(torch.float32) for s in selected}
        for t in layout.targets
    }
    text_rows = {
        encoder: tuple(
            (tok, adapters[s.concept].tensors[token_key(tok, encoder)].to(torch.float32))
            for s in selected
            for tok in s.tokens
        )
        for encoder in layout.token_dims
    }
    base = BaseFolder(resolve_base(layout.base))
    # Cheap (the targets only) and it stops a merge onto a base edited since the registry
    # was made, which would silently produce weights nobody trained for.
    if fingerprint(base, layout.targets) != layout.base_fingerprint:
        raise ValidationFailed(
            f"the base at {base.root} is not the one this registry was made for "
            "(its target weights changed)"
        )
    return MergePlan(
        layout=layout,
        base=base,
        selected=tuple(selected),
        ups=ups,
        bases=load_basis(registry.basis_path(), layout),
        text_rows=text_rows,
    )
