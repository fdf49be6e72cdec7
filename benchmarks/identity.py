"""Identity benchmark (issues #7, #11; docs/design.md §10): toy concepts of four kinds, each
trained alone, merged N at a time, measured in function space (single-step and guided), on the
empty prompt and on sampled images.

Methods: ``blockctl`` (slots + ROE, the trainer's and layout's defaults; one row set per training
seed), ``slots-no-roe`` (the ablation), and ordinary peft LoRA on the same targets, rank and
tokens merged by ``lora-sum``, ``lora-ties`` and ``lora-dare`` (see lora_baseline.py). The LoRA
baseline's settings are pinned below (an ordinary LoRA: no erasure, no token bound, a fixed step
budget), so a changed blockctl default never changes it. The first N concepts of the list are
merged; the list interleaves the kinds so every prefix mixes them. Every run trains on the same
photos (seed 0); ``--seeds`` varies the training.

Trained adapters are cached under ``--work`` in a folder named by a hash of their settings, so a
re-run only measures and a changed default retrains. Seeded throughout::

    python benchmarks/identity.py --seeds 0,1              # 15 concepts, hours on 2 CPU cores
    python benchmarks/identity.py --methods blockctl --ns 1,5 --seeds 0
    python benchmarks/identity.py --concepts all --ns 15,20 --methods blockctl,lora-sum
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from bench_meta import RESULTS, run_meta
from identity_common import line, photos_for, slot_registry, slot_row
from lora_baseline import COMBINATIONS, LoraConcept, base_dir, lora_row, train_lora, unet_targets

from blockctl.initialize import init_registry
from blockctl.layout import DEFAULT_PRESET
from blockctl.toy.concepts import CONCEPTS
from blockctl.train.config import TrainConfig
from registry import Registry, open_registry

ORDER = [
    "rex", "brick", "vangogh", "alice", "dotty", "robo", "sunset", "neon", "zigzag", "smiley",
    "ocean", "pixel", "crown", "heart", "donut", "moon", "arrow", "gem", "grass", "sepia",
]  # fmt: skip
FIFTEEN = ",".join(ORDER[:15])
# 20 slots of rank 4 (80 of the 128 basis columns): room for every demo concept.
LAYOUT: dict[str, Any] = {"preset": DEFAULT_PRESET, "text_encoder": False, "slots": 20}
SLOT_METHODS: dict[str, dict[str, Any]] = {
    "blockctl": {},
    "slots-no-roe": {"roe": False},
    # Equal learning strength (issue #11): stop at probe ‖δ‖² 1e-2, between 200 and 1200 steps.
    "blockctl-strength": {"strength_target": 1e-2, "min_steps": 200, "steps": 1200},
}
METHODS = (*SLOT_METHODS, *COMBINATIONS)
# The ordinary LoRA baseline, spelt out: what people train and merge today.
LORA_SETTINGS: dict[str, Any] = {
    "steps": 600, "lr": 3e-3, "embedding_lr": 1e-2, "batch_size": 2, "roe": False,
    "token_norm_bound": 0.0, "strength_target": 0.0,
}  # fmt: skip


def settings_key(kind: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{kind}-{digest}"


def slot_key(method: str, seed: int) -> str:
    train = TrainConfig().with_overrides({"seed": seed, **SLOT_METHODS[method]}).to_dict()
    if not train["roe"]:  # ROE's settings do not change a run without it
        train = {k: v for k, v in train.items() if not k.startswith("roe_")}
    return settings_key(method, {"layout": LAYOUT, "train": train})


def lora_concepts(
    work: Path, concepts: list[str], seed: int
) -> tuple[Registry, list[LoraConcept], dict[str, float]]:
    folder = work / settings_key("lora", {"layout": LAYOUT, **LORA_SETTINGS, "seed": seed})
    reg = open_registry(str(folder / "registry"))
    if not reg.exists():
        init_registry(reg, "toy", **LAYOUT)
    seconds: dict[str, float] = {}
    out = []
    for name in concepts:
        path = folder / "adapters" / f"{name}.safetensors"
        cls = CONCEPTS[name].class_word
        if not any(r.concept == name for r in reg.slots()):
            reg.reserve(name, f"<{name}>", cls, "benchmark")
        if not path.exists():
            overrides = {**LORA_SETTINGS, "seed": seed}
            seconds[name] = train_lora(reg, photos_for(work, name), name, path, overrides)
            print(f"lora: trained {name} in {seconds[name]:.0f} s", flush=True)
        out.append(LoraConcept(name, f"<{name}>", cls, path))
    return reg, out, seconds


def measure(method: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    concepts = args.concepts.split(",")
    ns = [n for n in (int(x) for x in args.ns.split(",")) if n <= len(concepts)]
    if method in SLOT_METHODS:
        folder = args.work / slot_key(method, seed)
        reg, _ = slot_registry(
            folder, args.work, concepts, {"seed": seed, **SLOT_METHODS[method]}, LAYOUT, seed,
            method,
        )  # fmt: skip
        if args.train_only:
            return []
        return [slot_row(method, reg, concepts[:n], seed) for n in ns]
    lreg, trained, _ = lora_concepts(args.work, concepts, seed)
    if args.train_only:
        return []
    base, modules = base_dir(lreg), unet_targets(lreg)
    return [lora_row(method, base, trained[:n], modules, seed) for n in ns]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concepts", default=FIFTEEN, help="comma list, or 'all' (20)")
    parser.add_argument("--methods", default="blockctl,lora-sum,lora-ties,lora-dare")
    parser.add_argument("--ns", default="1,2,3,5,10,15")
    parser.add_argument("--seeds", default="0", help="training seeds of blockctl (comma list)")
    parser.add_argument("--lora-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.identity-work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "identity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.concepts == "all":
        args.concepts = ",".join(ORDER)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    meta = run_meta()
    for method in methods:
        seeds = (
            [int(s) for s in args.seeds.split(",")] if method in SLOT_METHODS else [args.lora_seed]
        )
        for seed in seeds:
            measured = measure(method, args, seed)
            for r in measured:
                r["run"] = meta
                print(line(r), f" merge {r['merge_seconds']:.2f} s", flush=True)
            if measured:
                save(args.out, measured)


def save(out: Path, measured: list[dict[str, Any]]) -> None:
    """Replace the rows of the same method, seed, base and N; keep the rest (several runs may
    go side by side, one thread each, so re-read first)."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["method"], r.get("seed", 0), r.get("base", "toy"), r["n"])

    new = {key(r) for r in measured}
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if key(r) not in new] + measured
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r.get("base", "toy"), r.get("seed", 0),
                             r["n"]))  # fmt: skip
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
