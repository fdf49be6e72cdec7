"""The sweep behind blockctl's layout and ROE defaults (issue #7, docs/design.md §4).

Four toy concepts, one of each kind, each trained alone with one setting, then merged all four
together and measured (docs/design.md §10). From N = 4 the sweep projects N = 15 linearly: the
other concepts' contributions are independent updates, so crosstalk grows with their count,
``crosstalk_15 ≈ crosstalk_4 · 14/3`` and ``prior_15 ≈ drift + (prior_4 − drift) · 14/3``; the
full benchmark (identity.py) then measures N = 15 itself for the setting chosen here.

    python benchmarks/identity_sweep.py --configs baseline,p1-l10,p1-l10-mixed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_meta import RESULTS, run_meta
from identity_common import line, save_setting_row, slot_registry, slot_row

CONCEPTS = ["rex", "brick", "vangogh", "alice"]  # subject, scene, style, person
CROSS_KV = {"preset": "cross-kv", "text_encoder": False}

# name: (layout, trainer overrides). "baseline" is the trainer's defaults before this sweep.
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": (CROSS_KV, {"roe_prob": 0.5, "roe_weight": 3.0, "roe_latents": "concept"}),
    "no-roe": (CROSS_KV, {"roe": False}),
    "p1-l10": (CROSS_KV, {"roe_prob": 1.0, "roe_weight": 10.0, "roe_latents": "concept"}),
    "p1-l10-mixed": (CROSS_KV, {"roe_prob": 1.0, "roe_weight": 10.0, "roe_latents": "mixed"}),
    "p1-l10-random": (CROSS_KV, {"roe_prob": 1.0, "roe_weight": 10.0, "roe_latents": "random"}),
    "p1-l30-mixed": (CROSS_KV, {"roe_prob": 1.0, "roe_weight": 30.0, "roe_latents": "mixed"}),
    "p1-l10-mixed-iso": (
        CROSS_KV,
        {"roe_prob": 1.0, "roe_weight": 10.0, "roe_latents": "mixed", "token_isolation": 1.0},
    ),
    "p1-l30-mixed-iso": (
        CROSS_KV,
        {"roe_prob": 1.0, "roe_weight": 30.0, "roe_latents": "mixed", "token_isolation": 1.0},
    ),
    "p1-l10-b2": (
        CROSS_KV,
        {"roe_prob": 1.0, "roe_weight": 10.0, "roe_latents": "concept", "roe_batch_size": 2},
    ),
}


def add_layout_variants(best: str) -> None:
    """The preset and text-encoder variants, and the step budget, around the chosen ROE."""
    layout, overrides = CONFIGS[best]
    CONFIGS[f"{best}+attn"] = ({"preset": "attn", "text_encoder": False}, overrides)
    CONFIGS[f"{best}+te"] = ({"preset": "cross-kv", "text_encoder": True}, overrides)
    for steps in (300, 1200):
        CONFIGS[f"{best}@{steps}"] = (layout, {**overrides, "steps": steps})


def projected(row: dict[str, Any], n_to: int = 15) -> dict[str, float]:
    k = (n_to - 1) / (row["n"] - 1)
    drift = row["mean_prior_drift"]
    return {
        "crosstalk_15": row["mean_crosstalk"] * k,
        "prior_interference_15": drift + (row["mean_prior_interference"] - drift) * k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--configs", default="baseline")
    parser.add_argument("--around", default=None, help="add preset/TE/steps variants of this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.identity-work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "identity_sweep.json")
    args = parser.parse_args()
    if args.around:
        add_layout_variants(args.around)
    for name in args.configs.split(","):
        layout, overrides = CONFIGS[name]
        reg, seconds = slot_registry(
            args.work / "sweep" / name, args.work, CONCEPTS, overrides, layout, args.seed, name
        )
        t0 = time.perf_counter()
        row = slot_row(name, reg, CONCEPTS)
        row.update(
            layout=layout,
            overrides=overrides,
            train_seconds=seconds or None,
            eval_seconds=round(time.perf_counter() - t0, 1),
            **projected(row),
            run=run_meta(),
        )
        print(line(row), f" → N=15 ≈ crosstalk {row['crosstalk_15']:.3f}, "
              f"prior {row['prior_interference_15']:.3f}", flush=True)  # fmt: skip
        save_setting_row(args.out, row, CONCEPTS, how=__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
