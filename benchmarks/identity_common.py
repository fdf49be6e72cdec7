"""Helpers shared by the identity benchmark and its sweep: photos, training into a registry,
and one measured merge. Seeded; trained adapters are cached under a work folder."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockctl.evaluate import ConceptMetrics, EvalConfig, evaluate
from blockctl.initialize import init_registry
from blockctl.merge import MergeOptions, merge
from blockctl.toy.concepts import CONCEPTS, render_concept
from blockctl.train import TrainRequest, train
from registry import Registry, open_registry

PHOTOS_PER_CONCEPT = 12


def photos_for(work: Path, name: str, seed: int) -> Path:
    photos = work / "photos" / name
    if not photos.is_dir():
        tmp = photos.with_name(name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(render_concept(name, PHOTOS_PER_CONCEPT, seed)):
            img.save(tmp / f"{i:03d}.png")
        tmp.rename(photos)
    return photos


def slot_registry(
    folder: Path,
    work: Path,
    concepts: Sequence[str],
    overrides: dict[str, Any],
    layout: dict[str, Any],
    seed: int,
    label: str,
) -> tuple[Registry, dict[str, float]]:
    """A registry under ``folder`` with every concept trained and published (cached): each is
    reserved just before it trains, as contributors arriving one by one would."""
    reg = open_registry(str(folder / "registry"))
    if not reg.exists():
        init_registry(reg, "toy", **layout)
    published = {a.concept for a in reg.adapters()}
    seconds: dict[str, float] = {}
    for name in concepts:
        if name in published:
            continue
        photos = photos_for(work, name, seed)
        if not any(r.concept == name for r in reg.slots()):
            reg.reserve(name, f"<{name}>", CONCEPTS[name].class_word, "benchmark")
        t0 = time.perf_counter()
        request = TrainRequest(
            photos=photos,
            concept=name,
            out_dir=folder / "runs" / name,
            overrides={"seed": seed, **overrides},
            sample=False,
        )
        train(reg, request, say=lambda _m: None)
        seconds[name] = time.perf_counter() - t0
        print(f"{label}: trained {name} in {seconds[name]:.0f} s", flush=True)
    return reg, seconds


def row(
    method: str, names: list[str], metrics: Sequence[ConceptMetrics], merge_seconds: float
) -> dict[str, Any]:
    """One results row (the format issue #7 asks for, plus prior drift and per-concept rows)."""
    retention = [m.retention for m in metrics]
    return {
        "method": method,
        "n": len(names),
        "concepts": names,
        "mean_retention": statistics.fmean(retention),
        "min_retention": min(retention),
        "mean_crosstalk": statistics.fmean(m.crosstalk for m in metrics),
        "mean_prior_interference": statistics.fmean(m.prior_interference for m in metrics),
        "mean_prior_drift": statistics.fmean(m.prior_drift for m in metrics),
        "mean_fidelity": statistics.fmean(m.fidelity for m in metrics),
        "mean_delta_sq": statistics.fmean(m.delta_sq for m in metrics),
        "per_concept": [m.to_dict() for m in metrics],
        "merge_seconds": round(merge_seconds, 4),
    }


def slot_row(method: str, reg: Registry, subset: list[str]) -> dict[str, Any]:
    """Merge ``subset`` for real (timed, to a diffusers folder), then measure it in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        merge(reg, subset, MergeOptions(out=Path(tmp) / "merged"))
        merge_seconds = time.perf_counter() - t0
    return row(method, subset, evaluate(reg, subset, None, EvalConfig()), merge_seconds)


def line(r: dict[str, Any]) -> str:
    return (
        f"{r['method']:>13} N={r['n']:>2}: retention {r['mean_retention']:.3f} "
        f"(min {r['min_retention']:.3f})  crosstalk {r['mean_crosstalk']:.3f}  "
        f"prior interference {r['mean_prior_interference']:.3f}  "
        f"drift {r['mean_prior_drift']:.3f}  fidelity {r['mean_fidelity']:.3f}  "
        f"‖δ‖² {r['mean_delta_sq']:.2e}"
    )
