"""Checks that adapters are intact and disjoint (docs/design.md §9)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blockctl import blocks
from blockctl.adapter import Adapter, load_adapter, payload_sha256, token_key, up_key
from blockctl.errors import ValidationFailed
from blockctl.layout import Layout, load_basis, sha256_file
from registry.base import PUBLISHED, RESERVED, Registry, SlotRecord

ORTHO_TOL = 1e-5


def adapter_problems(adapter: Adapter, layout: Layout, record: SlotRecord | None) -> list[str]:
    """Every reason ``adapter`` does not belong in this layout at its reserved slot."""
    meta = adapter.meta
    problems = []
    if meta.layout_hash != layout.layout_hash:
        problems.append("made for another layout (layout hash differs)")
    if meta.base_fingerprint != layout.base_fingerprint:
        problems.append("made for another base model (base fingerprint differs)")
    if meta.rank != layout.rank:
        problems.append(f"rank {meta.rank} but the layout's rank is {layout.rank}")
    if meta.scale != layout.scale:
        # merge applies the layout's scale: a different one would merge at the wrong strength
        problems.append(f"scale {meta.scale} but the layout's scale is {layout.scale}")
    if record is None:
        problems.append(f"no slot is reserved for concept {meta.concept!r}")
    else:
        if record.slot != meta.slot:
            problems.append(
                f"claims slot {meta.slot} but {meta.concept!r} holds slot {record.slot}"
            )
        if tuple(meta.tokens) != (record.token,):
            problems.append(
                f"tokens {list(meta.tokens)} but the reserved token is {record.token!r}"
            )
    if not 0 <= meta.slot < layout.slots:
        problems.append(f"slot {meta.slot} is outside 0..{layout.slots - 1}")
    encoders = tuple(layout.token_dims)
    if tuple(meta.text_encoders) != encoders:
        problems.append(
            f"token rows for {', '.join(meta.text_encoders)} but the base's text encoders are "
            f"{', '.join(encoders)}"
        )
    expected = {up_key(t.name): (t.out_features, layout.rank) for t in layout.targets}
    expected |= {
        token_key(tok, encoder): (1, width)
        for encoder, width in layout.token_dims.items()
        for tok in meta.tokens
    }
    keys = set(adapter.tensors)
    missing, extra = sorted(expected.keys() - keys), sorted(keys - expected.keys())
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for key in sorted(keys & expected.keys()):
        t = adapter.tensors[key]
        if tuple(t.shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(t.shape)}, expected {expected[key]}")
        elif not t.is_floating_point():
            problems.append(f"{key} is {t.dtype}, not a float tensor")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{key} holds NaN or inf values")
    if payload_sha256(adapter.tensors) != adapter.payload_sha256:
        problems.append("tensor payload does not match its sha256 (modified or damaged)")
    return problems


def check_for_publish(path: Path, layout: Layout, registry: Registry) -> Adapter:
    """The adapter at ``path`` if it may be published, else ValidationFailed with reasons."""
    adapter = load_adapter(path)
    record = next((r for r in registry.slots() if r.concept == adapter.meta.concept), None)
    if record is not None and record.status not in (RESERVED, PUBLISHED):
        record = None
    problems = adapter_problems(adapter, layout, record)
    if problems:
        raise ValidationFailed(f"{path.name}: " + "; ".join(problems))
    return adapter


@dataclass(frozen=True)
class AdapterReport:
    concept: str
    slot: int
    sha256: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RegistryReport:
    adapters: tuple[AdapterReport, ...]
    problems: tuple[str, ...] = ()
    max_cross_product: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(a.ok for a in self.adapters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "max_cross_product": self.max_cross_product,
            "adapters": [
                {
                    "concept": a.concept,
                    "slot": a.slot,
                    "sha256": a.sha256,
                    "ok": a.ok,
                    "problems": list(a.problems),
                }
                for a in self.adapters
            ],
        }


def verify_registry(registry: Registry, layout: Layout) -> RegistryReport:
    """Every published adapter intact, at its reserved slot, and disjoint from the others."""
    problems: list[str] = []
    bases = load_basis(registry.basis_path(), layout)
    for d, basis in bases.items():
        err = float((basis.T @ basis - torch.eye(d)).abs().max())
        if err > ORTHO_TOL:
            problems.append(f"basis {d} is not orthonormal (max error {err:.2e})")
    records = {r.concept: r for r in registry.slots()}
    reports = []
    for rec in registry.adapters():
        path = registry.adapter_file(rec.concept)
        found: list[str] = []
        if sha256_file(path) != rec.sha256:
            found.append("stored file does not match the registry's sha256")
        try:
            adapter = load_adapter(path)
        except ValidationFailed as exc:
            found.append(exc.message)
        else:
            found += adapter_problems(adapter, layout, records.get(rec.concept))
        reports.append(AdapterReport(rec.concept, rec.slot, rec.sha256, tuple(found)))
    slots = [r.slot for r in reports]
    if len(set(slots)) != len(slots):
        problems.append("two adapters share a slot")
    tokens = [records[r.concept].token for r in reports if r.concept in records]
    if len(set(tokens)) != len(tokens):
        problems.append("two adapters share a token")
    worst = max_cross_product(bases, sorted(set(slots)), layout.rank)
    if worst > ORTHO_TOL:
        problems.append(f"slot subspaces overlap: max|A_s A_tᵀ| = {worst:.2e}")
    return RegistryReport(tuple(reports), tuple(problems), worst)


def max_cross_product(bases: dict[int, torch.Tensor], slots: list[int], rank: int) -> float:
    """``max |A_s A_tᵀ|`` over pairs of distinct slots and every basis width."""
    worst = 0.0
    for basis in bases.values():
        downs = {s: blocks.slot_down(basis, s, rank) for s in slots}
        for s, t in itertools.combinations(slots, 2):
            worst = max(worst, float((downs[s] @ downs[t].T).abs().max()))
    return worst
