"""Validation of the sample-level identity distance (blockctl/sample_identity.py) on the toy
world: it must see the concept, not the phase of a background texture.

Two sets of image pairs, seeded:
- **phase pairs**: one world scene (shape, colour, place) on a patterned background, and the
  same scene with the background pattern shifted by 1–11 pixels — what two samples of one seed
  often differ by, and what must count as "the same";
- **concept pairs**: for each of the 20 demo concepts, one scene with the concept and the same
  scene without it (blockctl.toy.concepts.with_and_without) — what must count as "different".

Reported: the distance's spread on each set, and the share of concept pairs farther apart than
the farthest phase pair (1.0 = every concept change is told from every texture shift). The phase
pairs also get a different noise realisation where the pattern is "noisy" (a roll alone keeps
every pixel value), so the set is not trivially zero.

    python benchmarks/sample_distance.py
"""

from __future__ import annotations

import json
import statistics

import numpy as np
from bench_meta import RESULTS, run_meta

from blockctl.sample_identity import distance
from blockctl.toy.concepts import CONCEPTS, with_and_without
from blockctl.toy.world import COLOR_RGB, draw_background, random_scene, shape_mask

KINDS = ("subject", "person", "scene", "style")
PATTERNED = ("striped", "checkered", "dotted", "noisy")
PAIRS = 200
CONCEPT_SEEDS = 10
OUT = RESULTS / "sample_distance.json"


def phase_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    scene = random_scene(rng)
    while scene.shape is None or scene.color is None:
        scene = random_scene(rng)
    kind = PATTERNED[rng.integers(len(PATTERNED))]
    bg = draw_background(kind, rng)
    shifted = np.roll(bg, tuple(int(x) for x in rng.integers(1, 12, size=2)), axis=(0, 1))
    if kind == "noisy":  # the same tone, another draw of the noise
        noise = rng.normal(0, 14, size=(*bg.shape[:2], 1)).astype(np.float32)
        shifted = np.clip(bg.mean(axis=(0, 1)) + noise, 80, 180)
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)
    for img in (bg, shifted):
        img[mask] = np.asarray(COLOR_RGB[scene.color], np.float32)
    return bg, shifted


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "p95": float(np.percentile(values, 95)),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    phase = [distance(*phase_pair(rng)) for _ in range(PAIRS)]
    by_concept = {
        name: [distance(*with_and_without(name, seed)) for seed in range(CONCEPT_SEEDS)]
        for name in CONCEPTS
    }
    worst_phase = max(phase)
    concept = [d for ds in by_concept.values() for d in ds]
    results = {
        **run_meta(),
        "phase_pairs": summary(phase),
        "concept_pairs": summary(concept),
        "concept_pairs_by_kind": {
            kind: summary(
                [d for n, ds in by_concept.items() if CONCEPTS[n].kind == kind for d in ds]
            )
            for kind in ("subject", "person", "scene", "style")
        },
        "concept_min_by_concept": {n: min(ds) for n, ds in by_concept.items()},
        "separated_share": sum(d > worst_phase for d in concept) / len(concept),
        "pairs": {"phase": PAIRS, "concept": len(concept)},
    }
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {k: results[k] for k in ("phase_pairs", "concept_pairs", "separated_share")}, indent=2
        )
    )
    print({n: round(v, 3) for n, v in results["concept_min_by_concept"].items()})


if __name__ == "__main__":
    main()
