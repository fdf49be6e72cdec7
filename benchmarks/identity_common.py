"""Helpers shared by the identity benchmark and its sweep: photos, training into a registry,
and one measured merge. Seeded; trained adapters are cached under a work folder."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockctl.evaluate import ConceptMetrics, EvalConfig, evaluate, summarize
from blockctl.initialize import init_registry
from blockctl.merge import MergeOptions, merge
from blockctl.toy.concepts import CONCEPTS, render_concept
from blockctl.train import TrainRequest, train
from registry import Registry, open_registry

PHOTOS_PER_CONCEPT = 12
PHOTO_SEED = 0  # every run trains on the same photos: a training seed varies the training only


def photos_for(work: Path, name: str) -> Path:
    photos = work / "photos" / name
    if not photos.is_dir():
        tmp = photos.with_name(name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(render_concept(name, PHOTOS_PER_CONCEPT, PHOTO_SEED)):
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
        photos = photos_for(work, name)
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
    method: str,
    names: list[str],
    metrics: Sequence[ConceptMetrics],
    merge_seconds: float,
    seed: int = 0,
    base: str = "toy",
) -> dict[str, Any]:
    """One results row: the format of issue #7 (means, min retention) plus the worst cases,
    the guided / empty-prompt / sample-level figures of issue #11 and per-concept rows."""
    s = summarize(metrics)

    def mean(key: str) -> float | None:
        return s[key]["mean"] if key in s else None

    def worst(key: str) -> float | None:
        return s[key]["worst"] if key in s else None

    return {
        "method": method,
        "base": base,
        "seed": seed,
        "n": len(names),
        "concepts": names,
        "mean_retention": mean("retention"),
        "min_retention": worst("retention"),
        "mean_crosstalk": mean("crosstalk"),
        "max_crosstalk": worst("crosstalk"),
        "mean_prior_interference": mean("prior_interference"),
        "max_prior_interference": worst("prior_interference"),
        "empty_prompt_interference": mean("empty_interference"),
        "max_empty_prompt_interference": worst("empty_interference"),
        "mean_prior_drift": mean("prior_drift"),
        "mean_fidelity": mean("fidelity"),
        "mean_delta_sq": mean("delta_sq"),
        "min_delta_sq": worst("delta_sq"),
        "guided_mean_retention": mean("guided_retention"),
        "guided_min_retention": worst("guided_retention"),
        "guided_mean_crosstalk": mean("guided_crosstalk"),
        "guided_max_crosstalk": worst("guided_crosstalk"),
        "guided_mean_prior_interference": mean("guided_prior_interference"),
        "guided_max_prior_interference": worst("guided_prior_interference"),
        "sample_identity": mean("sample_identity"),
        "min_sample_identity": worst("sample_identity"),
        "per_concept": [m.to_dict() for m in metrics],
        "merge_seconds": round(merge_seconds, 4),
    }


def slot_row(method: str, reg: Registry, subset: list[str], seed: int = 0) -> dict[str, Any]:
    """Merge ``subset`` for real (timed, to a diffusers folder), then measure it in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        merge(reg, subset, MergeOptions(out=Path(tmp) / "merged"))
        merge_seconds = time.perf_counter() - t0
    metrics = evaluate(reg, subset, None, EvalConfig())
    return row(method, subset, metrics, merge_seconds, seed=seed)


def line(r: dict[str, Any]) -> str:
    identity = r["sample_identity"]
    return (
        f"{r['method']:>13} N={r['n']:>2}: retention {r['mean_retention']:.3f} "
        f"(min {r['min_retention']:.3f})  crosstalk {r['mean_crosstalk']:.3f} "
        f"(max {r['max_crosstalk']:.3f})  prior {r['mean_prior_interference']:.3f} "
        f"(max {r['max_prior_interference']:.3f})  empty {r['empty_prompt_interference']:.3f}  "
        f"guided crosstalk {r['guided_mean_crosstalk']:.3f}  "
        f"identity {'–' if identity is None else f'{identity:.3f}'}  "
        f"‖δ‖² {r['mean_delta_sq']:.2e} (min {r['min_delta_sq']:.1e})"
    )


def save_setting_row(out: Path, row: dict[str, Any], concepts: Sequence[str], **extra: Any) -> None:
    """Store one setting's row in ``out`` (``{"rows": [...], "concepts": [...], **extra}``),
    replacing that setting's earlier row and keeping everything else. Re-read just before
    writing: several runs may go side by side, one thread each."""
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results["rows"] = [r for r in results["rows"] if r["method"] != row["method"]] + [row]
    results["concepts"] = list(concepts)
    results.update(extra)
    out.write_text(json.dumps(results, indent=2) + "\n")
