"""Identity benchmark (DESIGN section 10): concepts trained independently, merged N at a time,
measured in function space. Methods: ``blockctl`` (slots + ROE, the trainer's defaults) and
``slots-no-roe`` (the ablation). The ordinary-LoRA baselines (sum, TIES, DARE) are not here yet.

Trained adapters are kept under ``--work`` so a re-run only measures. Seeded throughout::

    python benchmarks/identity.py --concepts rex,brick,vangogh,alice,dotty --ns 1,2,3,5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from blockctl.evaluate import EvalConfig, evaluate
from blockctl.initialize import init_registry
from blockctl.merge import MergeOptions, merge
from blockctl.toy.concepts import CONCEPTS, render_concept
from blockctl.train import TrainRequest, train
from registry import Registry, open_registry

METHODS = {"blockctl": {}, "slots-no-roe": {"roe": False}}


def trained_registry(work: Path, method: str, concepts: list[str], seed: int) -> Registry:
    reg = open_registry(str(work / method / "registry"))
    if not reg.exists():
        init_registry(reg, "toy")
    published = {a.concept for a in reg.adapters()}
    for name in concepts:
        if name in published:
            continue
        photos = work / "photos" / name
        if not photos.is_dir():
            photos.mkdir(parents=True)
            for i, (img, _) in enumerate(render_concept(name, 12, seed)):
                img.save(photos / f"{i:03d}.png")
        if not any(r.concept == name for r in reg.slots()):
            reg.reserve(name, f"<{name}>", CONCEPTS[name].class_word, "benchmark")
        overrides = {"seed": seed, **METHODS[method]}
        t0 = time.perf_counter()
        request = TrainRequest(
            photos=photos,
            concept=name,
            out_dir=work / method / "runs" / name,
            overrides=overrides,
            sample=False,
        )
        train(reg, request, say=lambda _m: None)
        print(f"{method}: trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return reg


def row(method: str, reg: Registry, subset: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        merge(reg, subset, MergeOptions(out=Path(tmp) / "merged"))
        merge_seconds = time.perf_counter() - t0
    metrics = evaluate(reg, subset, None, EvalConfig())
    retention = [m.retention for m in metrics]
    return {
        "method": method,
        "n": len(subset),
        "concepts": subset,
        "mean_retention": statistics.fmean(retention),
        "min_retention": min(retention),
        "mean_crosstalk": statistics.fmean(m.crosstalk for m in metrics),
        "mean_prior_interference": statistics.fmean(m.prior_interference for m in metrics),
        "mean_prior_drift": statistics.fmean(m.prior_drift for m in metrics),
        "mean_fidelity": statistics.fmean(m.fidelity for m in metrics),
        "mean_delta_sq": statistics.fmean(m.delta_sq for m in metrics),
        "merge_seconds": round(merge_seconds, 4),
        "per_concept": [m.to_dict() for m in metrics],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concepts", default="rex,brick,vangogh,alice,dotty")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ns", default="1,2,3,5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.identity-work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/identity.json"))
    args = parser.parse_args()
    concepts = args.concepts.split(",")
    ns = [n for n in (int(x) for x in args.ns.split(",")) if n <= len(concepts)]
    rows = []
    for method in args.methods.split(","):
        reg = trained_registry(args.work, method, concepts, args.seed)
        for n in ns:
            rows.append(row(method, reg, concepts[:n]))
            r = rows[-1]
            print(
                f"{method:>13} N={n:>2}: retention {r['mean_retention']:.3f} "
                f"(min {r['min_retention']:.3f})  crosstalk {r['mean_crosstalk']:.3f}  "
                f"prior interference {r['mean_prior_interference']:.3f}  "
                f"fidelity {r['mean_fidelity']:.3f}  ‖δ‖² {r['mean_delta_sq']:.2e}",
                flush=True,
            )
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
