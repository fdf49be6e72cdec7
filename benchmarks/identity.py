"""Identity benchmark (issue #7, DESIGN section 10): 15 toy concepts of four kinds, each trained
alone with the same budget, merged N at a time, measured in function space.

Methods: ``blockctl`` (slots + ROE, the trainer's and layout's defaults), ``slots-no-roe`` (the
ablation), and ordinary peft LoRA on the same targets, rank and tokens merged by ``lora-sum``,
``lora-ties`` and ``lora-dare`` (see lora_baseline.py). The first N concepts of the list are
merged; the list interleaves the kinds so every prefix mixes them.

Trained adapters are cached under ``--work`` in a folder named by a hash of their settings, so a
re-run only measures and a changed default retrains. Seeded throughout::

    python benchmarks/identity.py                      # ~1 h on 2 CPU cores, then cached
    python benchmarks/identity.py --methods blockctl --ns 1,5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from identity_common import line, photos_for, slot_registry, slot_row
from lora_baseline import COMBINATIONS, LoraConcept, base_dir, lora_row, train_lora, unet_targets

from blockctl.initialize import init_registry
from blockctl.layout import DEFAULT_PRESET
from blockctl.toy.concepts import CONCEPTS
from blockctl.train.config import TrainConfig
from registry import Registry, open_registry

ORDER = "rex,brick,vangogh,alice,dotty,robo,sunset,neon,zigzag,smiley,ocean,pixel,crown,heart,donut"
LAYOUT: dict[str, Any] = {"preset": DEFAULT_PRESET, "text_encoder": False}
SLOT_METHODS: dict[str, dict[str, Any]] = {"blockctl": {}, "slots-no-roe": {"roe": False}}
METHODS = (*SLOT_METHODS, *COMBINATIONS)


def settings_key(kind: str, overrides: dict[str, Any]) -> str:
    train = TrainConfig().with_overrides(overrides).to_dict()
    if not train["roe"]:  # ROE's settings do not change a run without it
        train = {k: v for k, v in train.items() if not k.startswith("roe_")}
    settings = {"layout": LAYOUT, "train": train}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{kind}-{digest}"


def lora_concepts(
    work: Path, concepts: list[str], seed: int
) -> tuple[Registry, list[LoraConcept], dict[str, float]]:
    folder = work / settings_key("lora", {"seed": seed, "roe": False})
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
            photos = photos_for(work, name, seed)
            seconds[name] = train_lora(reg, photos, name, path, {"seed": seed})
            print(f"lora: trained {name} in {seconds[name]:.0f} s", flush=True)
        out.append(LoraConcept(name, f"<{name}>", cls, path))
    return reg, out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--concepts", default=ORDER)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ns", default="1,2,3,5,10,15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.identity-work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/identity.json"))
    args = parser.parse_args()
    concepts = args.concepts.split(",")
    ns = [n for n in (int(x) for x in args.ns.split(",")) if n <= len(concepts)]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    rows: list[dict[str, Any]] = []
    train_seconds: dict[str, dict[str, float]] = {}
    for method in methods:
        if method in SLOT_METHODS:
            overrides = {"seed": args.seed, **SLOT_METHODS[method]}
            folder = args.work / settings_key(method, overrides)
            reg, seconds = slot_registry(
                folder, args.work, concepts, SLOT_METHODS[method], LAYOUT, args.seed, method
            )
            train_seconds[method] = seconds
            measured = [slot_row(method, reg, concepts[:n]) for n in ns]
        else:
            lreg, trained, seconds = lora_concepts(args.work, concepts, args.seed)
            train_seconds["lora"] = seconds
            base, modules = base_dir(lreg), unet_targets(lreg)
            measured = [lora_row(method, base, trained[:n], modules, args.seed) for n in ns]
        for r in measured:
            print(line(r), f" merge {r['merge_seconds']:.2f} s", flush=True)
        rows.extend(measured)
    if args.out.exists():  # keep rows of methods not re-measured this time
        kept = [r for r in json.loads(args.out.read_text()) if r["method"] not in methods]
        rows = kept + rows
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["n"]))
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    seconds_file = args.out.with_name("identity_train_seconds.json")
    if any(train_seconds.values()):
        old = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
        old.update({k: v for k, v in train_seconds.items() if v})
        old["measured_at"] = time.strftime("%Y-%m-%d")
        seconds_file.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
