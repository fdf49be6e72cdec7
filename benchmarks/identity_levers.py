"""The levers of issue #11, each on its own and together (docs/design.md §4 and §5): a bound on
the learnt token's norm, erasure prompts with random stand-in tokens, empty erasure prompts, and
how strongly each concept learns.

Six toy concepts (a subject, a scene, a style, a person, and the two kinds that learnt least in
the first identity benchmark) are each trained alone with one setting, then all six are merged and
measured (docs/design.md §10, with the guided, empty-prompt and sample-level figures). Every
setting is spelt out in full below, so a changed trainer default never changes what a row means;
trained adapters are cached under ``--work`` by a hash of the setting.

    python benchmarks/identity_levers.py --configs p1-l10,bound1 --train-only   # one thread each
    python benchmarks/identity_levers.py --configs p1-l10,bound1               # train + measure
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_meta import RESULTS, run_meta
from identity_common import line, save_setting_row, slot_registry, slot_row

CONCEPTS = ["rex", "brick", "vangogh", "alice", "heart", "robo"]
LAYOUT: dict[str, Any] = {"preset": "cross-kv", "text_encoder": False, "slots": 20}
# The first identity benchmark's defaults, spelt out: the reference every lever is measured from.
P1_L10: dict[str, Any] = {
    "steps": 600, "lr": 3e-3, "embedding_lr": 1e-2, "roe_prob": 1.0, "roe_weight": 10.0,
    "roe_latents": "concept", "token_norm_bound": 0.0, "roe_standin": 0.0,
    "roe_standin_offset": 1.0, "roe_empty": 0.0,
}  # fmt: skip


def variant(**changes: Any) -> dict[str, Any]:
    return {**P1_L10, **changes}


CONFIGS: dict[str, dict[str, Any]] = {
    "p1-l10": P1_L10,
    "bound1": variant(token_norm_bound=1.0),
    "empty10": variant(roe_empty=0.1),
    "standin30-unbounded-off10": variant(roe_standin=0.3, roe_standin_offset=10.0),
    "standin30-off10-empty10": variant(roe_standin=0.3, roe_standin_offset=10.0, roe_empty=0.1),
    "bound1-standin30": variant(token_norm_bound=1.0, roe_standin=0.3),
    "bound1-standin30-empty10": variant(token_norm_bound=1.0, roe_standin=0.3, roe_empty=0.1),
    "bound1-standin50-empty10": variant(token_norm_bound=1.0, roe_standin=0.5, roe_empty=0.1),
    "bound1-standin30-off05-empty10": variant(
        token_norm_bound=1.0, roe_standin=0.3, roe_standin_offset=0.5, roe_empty=0.1
    ),
    "bound1-standin30-off2-empty10": variant(
        token_norm_bound=1.0, roe_standin=0.3, roe_standin_offset=2.0, roe_empty=0.1
    ),
    # Equal learning strength: stop at probe ‖δ‖² 1e-2 (about the defaults' mean), 200–1200 steps.
    "strength1e-2": variant(strength_target=1e-2, min_steps=200, steps=1200),
}


def folder_for(work: Path, name: str, seed: int) -> Path:
    settings = {"layout": LAYOUT, "train": CONFIGS[name], "seed": seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return work / "levers" / f"{name}-{digest}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.identity-work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "identity_levers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.configs.split(","):
        overrides = CONFIGS[name]
        folder = folder_for(args.work, name, args.seed)
        reg, seconds = slot_registry(
            folder, args.work, CONCEPTS, overrides, LAYOUT, args.seed, name
        )
        if args.train_only:
            continue
        t0 = time.perf_counter()
        row = slot_row(name, reg, CONCEPTS, args.seed)
        row.update(
            overrides=overrides,
            train_seconds=seconds or None,
            eval_seconds=round(time.perf_counter() - t0, 1),
            run=run_meta(),
        )
        print(line(row), flush=True)
        save_setting_row(args.out, row, CONCEPTS)


if __name__ == "__main__":
    main()
