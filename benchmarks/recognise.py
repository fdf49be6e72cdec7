"""A per-concept recogniser for the toy world's 20 demo concepts, built on their exact look.

For each concept, a score computed from the image says "this concept is present"
(recognise_scorers.py): subjects and persons are a blob of their signature colours of plausible
size with the right pattern or arrangement inside; scenes are a background palette and layout;
styles are global statistics.

Each score is 0 when a condition fails and otherwise grows with the evidence; one threshold per
concept is calibrated on training-style renders (``render_concept`` with a calibration seed)
against negatives (other concepts' renders, plain world images and each concept's "without"
twin), and validated on held-out renders (``validate``), on clean two-concept composites
(``validate_composites``) and, with ``--registry``, on samples of trained concepts alone and of
the base's class prompts (``sample_alone``, ``generated_rates``: the images it must read).
numpy only, torch only to sample; images are HxWx3 uint8 or float in 0..255.

    python benchmarks/recognise.py                          # clean renders only
    python benchmarks/recognise.py --registry REG --images 8  # and samples of REG's concepts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from recognise_features import Image, to_hsv
from recognise_scorers import SCORERS


def scores(img: Image, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every named concept's score of one image (all 20 by default)."""
    c = to_hsv(img)
    return {n: SCORERS[n](c) for n in (names if names is not None else SCORERS)}


# --- calibration and validation -------------------------------------------------------------

CALIBRATION_SEED = 1  # training photos use seed 0 (identity_common.PHOTO_SEED)
HELD_OUT_SEED = 2
MAX_THRESHOLD = 0.5  # every condition at least half met: generated samples are weaker than renders


@dataclass(frozen=True)
class Recogniser:
    thresholds: dict[str, float]

    def present(self, name: str, img: Image) -> bool:
        return scores(img, [name])[name] >= self.thresholds[name]

    def recognised(self, img: Image, names: Sequence[str]) -> dict[str, bool]:
        s = scores(img, names)
        return {n: s[n] >= self.thresholds[n] for n in names}


@dataclass(frozen=True)
class Labelled:
    """Images with what is in each: a concept's name, or ``world`` / ``without:<concept>``."""

    images: list[Image]
    sources: list[str]


def renders(seed: int, per_concept: int) -> Labelled:
    """Training-style photos of every concept, plain world images and, per concept, its
    "without" twin (the world's own shape of its class in a world colour at the same place, or
    the unstyled image, or an ordinary background): the negatives closest to each concept."""
    from blockctl.toy.concepts import CONCEPTS, render_concept, with_and_without
    from blockctl.toy.world import sample_batch

    images: list[Image] = []
    sources: list[str] = []
    for name in CONCEPTS:
        images += [np.asarray(im) for im, _ in render_concept(name, per_concept, seed)]
        sources += [name] * per_concept
        images += [with_and_without(name, seed * 1000 + k)[1] for k in range(per_concept // 2)]
        sources += [f"without:{name}"] * (per_concept // 2)
    world, _ = sample_batch(per_concept * 2, seed)
    images += list(world)
    sources += ["world"] * len(world)
    return Labelled(images, sources)


def score_matrix(data: Labelled) -> dict[str, np.ndarray]:
    """Each concept's scores of every image."""
    rows = [scores(img) for img in data.images]
    return {n: np.array([r[n] for r in rows]) for n in SCORERS}


def threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """Halfway between the highest negative and the 5th-percentile positive, at most
    ``MAX_THRESHOLD``: as low as the negatives allow, because generated samples show a concept
    less clearly than the renders it was calibrated on."""
    return float(min(MAX_THRESHOLD, (neg.max() + np.percentile(pos, 5)) / 2))


def calibrate(seed: int = CALIBRATION_SEED, per_concept: int = 32) -> Recogniser:
    data = renders(seed, per_concept)
    m = score_matrix(data)
    src = np.array(data.sources)
    return Recogniser({n: threshold(m[n][src == n], m[n][src != n]) for n in SCORERS})


def rates(hit: np.ndarray, src: np.ndarray, name: str) -> dict[str, Any]:
    """True- and false-positive rates of one concept's decisions ``hit`` over images from
    ``src``, accuracy, and which sources the false positives came from."""
    pos = src == name
    tpr, fpr = float(hit[pos].mean()), float(hit[~pos].mean())
    offenders = sorted(set(src[~pos & hit]))
    return {
        "tpr": round(tpr, 4),
        "fpr": round(fpr, 4),
        "accuracy": round(float((hit == pos).mean()), 4),
        "balanced_accuracy": round((tpr + 1 - fpr) / 2, 4),
        "positives": int(pos.sum()),
        "negatives": int((~pos).sum()),
        "false_positives_from": {o: int((hit & (src == o)).sum()) for o in offenders},
    }


def validate(rec: Recogniser, seed: int = HELD_OUT_SEED, per_concept: int = 32) -> dict[str, Any]:
    """Per-concept rates on held-out renders (seed ``seed``) against every negative."""
    data = renders(seed, per_concept)
    m = score_matrix(data)
    src = np.array(data.sources)
    return {n: rates(m[n] >= rec.thresholds[n], src, n) for n in SCORERS}


# --- clean two-concept pictures ------------------------------------------------------------


def composite(first: str, second: str, rng: np.random.Generator) -> Image:
    """A clean picture of two concepts drawn with the toy world's own painters (private to
    blockctl.toy.concepts, which renders one concept at a time): a subject or person on a scene
    or on a world background, then a style over everything; two subjects side by side, smaller.
    ``first`` is a subject, person or scene; ``second`` a scene, style, subject or person."""
    from blockctl.toy import concepts as toy

    if first in toy._SCENES:
        img = toy._SCENES[first][0](rng)
    elif second in toy._SCENES:
        img = toy._SCENES[second][0](rng)
    else:
        img, _ = toy._bg(rng)
    if first in toy._SUBJECTS and second in toy._SUBJECTS:
        for name, cx in ((first, rng.uniform(15, 21)), (second, rng.uniform(43, 49))):
            toy._SUBJECTS[name][0](img, cx, rng.uniform(22, 42), rng.uniform(9, 12), rng)
    elif first in toy._SUBJECTS:
        toy._SUBJECTS[first][0](img, *toy._place(rng), rng)
    if second in toy._STYLES:
        img = toy._STYLES[second][0](img, rng)
    return np.clip(img, 0, 255).astype(np.uint8)


def composite_pairs() -> list[tuple[str, str]]:
    """Every pair one prompt can name: a subject or person with a scene, a style or another
    subject or person, and a scene with a style."""
    from blockctl.toy.concepts import CONCEPTS

    kind = {n: c.kind for n, c in CONCEPTS.items()}
    figures = [n for n in CONCEPTS if kind[n] in ("subject", "person")]
    scenes = [n for n in CONCEPTS if kind[n] == "scene"]
    styles = [n for n in CONCEPTS if kind[n] == "style"]
    return (
        [(f, s) for f in figures for s in scenes + styles]
        + [(a, b) for i, a in enumerate(figures) for b in figures[i + 1 :]]
        + [(s, v) for s in scenes for v in styles]
    )


def validate_composites(rec: Recogniser, per_pair: int, seed: int) -> dict[str, Any]:
    """Share of clean composites in which the recogniser finds both concepts, per pair and per
    kind of pair: an upper bound for what it can read in two-concept samples (a style that
    repaints everything, like neon or sepia, hides a subject's colours even here)."""
    from blockctl.toy.concepts import CONCEPTS

    rng = np.random.default_rng(seed)
    per_pair_share: dict[str, float] = {}
    by_kind: dict[str, list[float]] = {}
    for a, b in composite_pairs():
        hits = [all(rec.recognised(composite(a, b, rng), [a, b]).values()) for _ in range(per_pair)]
        share = per_pair_share[f"{a}+{b}"] = float(np.mean(hits))
        by_kind.setdefault(f"{CONCEPTS[a].kind}+{CONCEPTS[b].kind}", []).append(share)
    return {
        "images_per_pair": per_pair,
        "seed": seed,
        "by_kind": {k: round(float(np.mean(v)), 4) for k, v in by_kind.items()},
        "by_pair": per_pair_share,
    }


COMPOSITES_PER_PAIR = 8
COMPOSITE_SEED = 3


# --- generated samples ----------------------------------------------------------------------

GENERATED_SEED = (
    100  # sampler seeds GENERATED_SEED, +1, …: apart from those looked at while building
)


@dataclass(frozen=True)
class Samples:
    """Images per prompt from models of trained concepts, all on one base and one sampler."""

    rows: dict[str, list[Image]]  # label → images


def sample_alone(
    registry: str, concepts: Sequence[str], images: int, seed: int
) -> tuple[Samples, Samples]:
    """Each concept alone ("a photo of <token> {class}", the caption it was trained on, from
    the base with just that concept applied) and the base on each class prompt
    ("a photo of a {class}": the class without the concept, the closest generated negative)."""
    from blockctl.apply import Modules, applied
    from blockctl.base_model import resolve_base
    from blockctl.evaluate import EvalConfig, renderer
    from blockctl.layout import layout_of
    from blockctl.merge import plan_merge
    from blockctl.train.data import default_caption
    from registry import open_registry

    reg = open_registry(registry)
    base_dir = resolve_base(layout_of(reg).base)
    base = Modules.load(base_dir)
    render = renderer(base_dir, EvalConfig(images=images, seed=seed))
    plan = plan_merge(reg, concepts, {})
    records = {r.concept: r for r in reg.slots()}
    alone: dict[str, list[Image]] = {}
    for name in concepts:
        with applied(plan.only(name), base) as modules:
            prompt = default_caption(records[name].token, records[name].class_word)
            alone[name] = [np.asarray(im) for im in render(modules, prompt)]
    classes = sorted({records[n].class_word for n in concepts})
    prior = {c: [np.asarray(im) for im in render(base, f"a photo of a {c}")] for c in classes}
    return Samples(alone), Samples(prior)


def generated_rates(
    rec: Recogniser, alone: Samples, prior: Samples, class_of: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Per sampled concept: the share of its own samples recognised (true positives), the share
    of the base's samples of its class prompt recognised as it (false positives on the closest
    negative), and how often it is recognised in the other sampled concepts' samples."""
    decided = {
        label: [rec.recognised(img, list(SCORERS)) for img in imgs]
        for label, imgs in alone.rows.items()
    }
    out = {}
    for name in alone.rows:
        others = [d[name] for label, ds in decided.items() if label != name for d in ds]
        fires = {label: sum(d[name] for d in ds) for label, ds in decided.items() if label != name}
        prior_hits = [rec.present(name, img) for img in prior.rows[class_of[name]]]
        out[name] = {
            "samples": len(decided[name]),
            "tpr": round(float(np.mean([d[name] for d in decided[name]])), 4),
            "class_prompt_fpr": round(float(np.mean(prior_hits)), 4),
            "other_concepts_fpr": round(float(np.mean(others)), 4) if others else None,
            "false_positives_from": {k: v for k, v in fires.items() if v},
            "also_recognised": sorted(
                {o for d in decided[name] for o, hit in d.items() if hit and o != name}
            ),
        }
    return out


HIGHER_IS_BETTER = ("tpr", "accuracy", "balanced_accuracy")


def summary(rates_by_concept: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean and worst case over concepts of every rate (worst: lowest TPR or accuracy, highest
    false-positive rate)."""
    out = {}
    keys = [
        k for k, v in next(iter(rates_by_concept.values())).items() if k.endswith(("pr", "acy"))
    ]
    for k in keys:
        values = [r[k] for r in rates_by_concept.values() if r[k] is not None]
        if values:
            worst = min(values) if k in HIGHER_IS_BETTER else max(values)
            out[f"mean_{k}"] = round(float(np.mean(values)), 4)
            out[f"{'min' if k in HIGHER_IS_BETTER else 'max'}_{k}"] = round(float(worst), 4)
    return out


def check_generated(rec: Recogniser, registry: str, concepts: str | None, images: int) -> dict:
    import torch

    from registry import open_registry

    torch.set_num_threads(1)
    reg = open_registry(registry)
    names = concepts.split(",") if concepts else [a.concept for a in reg.adapters()]
    class_of = {r.concept: r.class_word for r in reg.slots()}
    alone, prior = sample_alone(registry, names, images, GENERATED_SEED)
    gen = generated_rates(rec, alone, prior, class_of)
    for name, r in gen.items():
        print(
            f"{name:>8}: generated TPR {r['tpr']:.2f}  class-prompt FPR "
            f"{r['class_prompt_fpr']:.2f}  others' samples FPR {r['other_concepts_fpr']}"
        )
    return {
        "registry": registry,
        "seed": GENERATED_SEED,
        "images_per_concept": images,
        "rates": gen,
        "summary": summary(gen),
    }


def main() -> None:
    import argparse
    import json

    from bench_meta import RESULTS, run_meta

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--per-concept", type=int, default=32, help="renders per concept")
    parser.add_argument("--registry", help="also sample its concepts and check recognition there")
    parser.add_argument("--concepts", help="comma list (default: every published concept)")
    parser.add_argument("--images", type=int, default=8, help="samples per concept")
    parser.add_argument("--out", type=Path, default=RESULTS / "recogniser.json")
    args = parser.parse_args()
    if args.per_concept < 2 or args.images < 1:
        parser.error("--per-concept must be at least 2 and --images positive")
    rec = calibrate(CALIBRATION_SEED, args.per_concept)
    held = validate(rec, HELD_OUT_SEED, args.per_concept)
    for name, r in held.items():
        print(
            f"{name:>8}: threshold {rec.thresholds[name]:.2f}  held-out TPR {r['tpr']:.3f}  "
            f"FPR {r['fpr']:.4f}  accuracy {r['accuracy']:.4f}",
            flush=True,
        )
    composites = validate_composites(rec, COMPOSITES_PER_PAIR, COMPOSITE_SEED)
    print("clean two-concept composites, both recognised:", composites["by_kind"], flush=True)
    result: dict[str, Any] = {
        "run": run_meta(),
        "calibration": {
            "seed": CALIBRATION_SEED,
            "renders_per_concept": args.per_concept,
            "max_threshold": MAX_THRESHOLD,
        },
        "held_out": {
            "seed": HELD_OUT_SEED,
            "renders_per_concept": args.per_concept,
            "summary": summary(held),
            "rates": held,
        },
        "thresholds": {n: round(t, 4) for n, t in rec.thresholds.items()},
        "clean_composites": composites,
    }
    if args.registry:
        result["generated"] = check_generated(rec, args.registry, args.concepts, args.images)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
