"""Two-concept prompts (issue #12, part 2): the number users feel.

For pairs of concepts of different kinds (subject + scene, subject + style, person + subject,
two subjects), sample "a photo of <s> {cls} on a <u> background" and the like from
(a) the merge of all N concepts, (b) the merge of just the pair and (c) the exact sum of all N
ordinary LoRAs (lora_baseline.py), with the same seeds, sampler and guidance; recognise each
named concept in every image with recognise.py, and report the share of samples in which both
are recognised. Beside it, a function-space figure on the pair prompt, from the noised-latent
probe of blockctl.evaluate: ‖ε_a − ε_b‖² / ‖ε_b − ε_base‖², how far the merge of all N moves the
pair's own prediction relative to how far the pair moved the base (the same for (c)).

    python benchmarks/composition.py --registry REG --lora LORA_DIR          # N = all published
    python benchmarks/composition.py --registry REG --concepts rex,brick,... \\
        --pairs rex+brick,rex+vangogh --images 4

Results: benchmarks/results/composition.json (one row per method and pair) and a picture grid,
benchmarks/results/composition.png (per pair, rows (b), (a), (c)).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL.Image import Resampling

KIND_ORDER = ("person", "subject", "scene", "style")  # the order a prompt names them in
# The four kinds of pair, in the order default pairs are drawn. Styles that keep a
# subject's colours come first: neon and sepia repaint the whole image, so no colour-based
# recogniser can see a subject through them.
CATEGORIES = (
    ("subject", "scene"),
    ("subject", "style"),
    ("person", "subject"),
    ("subject", "subject"),
)
STYLES_FIRST = ("vangogh", "pixel", "neon", "sepia")
PAIRS_PER_CATEGORY = 2
PAIR, ALL, LORA = "blockctl-pair", "blockctl-all", "lora-sum"  # (b), (a), (c)
SEED = 200  # sampler seeds SEED, SEED + 1, …: apart from those looked at while building


@dataclass(frozen=True)
class Concept:
    name: str
    token: str
    class_word: str
    kind: str


@dataclass(frozen=True)
class Pair:
    first: Concept  # the one a prompt names first (subject, person, then scene, then style)
    second: Concept

    @property
    def names(self) -> tuple[str, str]:
        return self.first.name, self.second.name

    @property
    def kinds(self) -> str:
        return f"{self.first.kind}+{self.second.kind}"

    def prompt(self) -> str:
        a, b = self.first, self.second
        if b.kind == "scene":
            return f"a photo of {a.token} {a.class_word} on a {b.token} background"
        if b.kind == "style":
            if a.kind == "scene":
                return f"a photo of a {a.token} background in {b.token} style"
            return f"a photo of {a.token} {a.class_word} in {b.token} style"
        return f"a photo of {a.token} {a.class_word} and {b.token} {b.class_word}"


def make_pair(a: Concept, b: Concept) -> Pair:
    """The pair in prompt order; two scenes or two styles cannot share one prompt."""
    if a.name == b.name:
        raise ValueError(f"a pair needs two different concepts, got {a.name} twice")
    first, second = sorted((a, b), key=lambda c: KIND_ORDER.index(c.kind))
    if first.kind == second.kind and first.kind in ("scene", "style"):
        raise ValueError(f"{a.name} and {b.name} are both {a.kind}s: one prompt cannot hold two")
    return Pair(first, second)


def default_pairs(
    concepts: Sequence[Concept], per_category: int = PAIRS_PER_CATEGORY
) -> list[Pair]:
    """Up to ``per_category`` pairs of each of the issue's kinds, in the concepts' order,
    preferring concepts no earlier pair used (so the pairs cover as many concepts as they can)."""

    def rank(c: Concept) -> int:
        return STYLES_FIRST.index(c.name) if c.name in STYLES_FIRST else -1

    out: list[Pair] = []
    for kind_a, kind_b in CATEGORIES:
        firsts = [c for c in concepts if c.kind == kind_a]
        seconds = sorted((c for c in concepts if c.kind == kind_b), key=rank)
        candidates = [
            (a, b) for a in firsts for b in seconds if a.name < b.name or kind_a != kind_b
        ]
        picked: list[Pair] = []
        while candidates and len(picked) < per_category:
            used = {n for p in out + picked for n in p.names}
            a, b = min(candidates, key=lambda ab: (ab[0].name in used) + (ab[1].name in used))
            candidates.remove((a, b))
            picked.append(make_pair(a, b))
        out += picked
    return out


def parse_pairs(text: str, by_name: dict[str, Concept]) -> list[Pair]:
    pairs = []
    for item in text.split(","):
        names = item.split("+")
        if len(names) != 2:
            raise ValueError(f"a pair is two concepts joined by '+', got {item!r}")
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"not among the merged concepts: {', '.join(missing)}")
        pairs.append(make_pair(by_name[names[0]], by_name[names[1]]))
    return pairs


# --- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One model's answer to every pair prompt: images and the probe's predictions."""

    images: dict[str, list[Any]]  # prompt → PIL images
    cond: dict[str, Any]  # prompt → prediction tensor (S, C, H, W)
    uncond: Any  # the empty prompt's prediction


def measure(modules: Any, prompts: Sequence[str], probe: Any, render: Any | None) -> Measured:
    """Images (none without ``render``) and predictions of ``prompts`` and the empty prompt."""
    from blockctl.evaluate import EMPTY_PROMPT, Predictions

    preds = Predictions(probe, modules)
    return Measured(
        {p: render(modules, p) for p in prompts} if render is not None else {},
        {p: preds([p])[0] for p in prompts},
        preds([EMPTY_PROMPT])[0],
    )


def distance(
    model: Measured, pair_only: Measured, base: Measured, prompt: str, g: float
) -> dict[str, float]:
    """‖ε_m − ε_b‖² / ‖ε_b − ε_base‖² on the pair prompt, single-step and guided."""
    from blockctl.evaluate import guided, ratio

    def sq(x: Any) -> float:
        return float((x.double() ** 2).mean())

    def gd(m: Measured) -> Any:
        return guided(m.cond[prompt], m.uncond, g)

    return {
        "function_space_distance": ratio(
            sq(model.cond[prompt] - pair_only.cond[prompt]),
            sq(pair_only.cond[prompt] - base.cond[prompt]),
        ),
        "guided_function_space_distance": ratio(
            sq(gd(model) - gd(pair_only)), sq(gd(pair_only) - gd(base))
        ),
    }


def recognition(rec: Any, images: Sequence[Any], pair: Pair) -> tuple[float, dict[str, float]]:
    """Share of images in which both named concepts are recognised, and each one's share."""
    decided = [rec.recognised(np.asarray(im), list(pair.names)) for im in images]
    each = {n: float(np.mean([d[n] for d in decided])) for n in pair.names}
    return float(np.mean([all(d.values()) for d in decided])), each


def lora_model(
    base: Any, base_dir: Path, folder: Path, concepts: Sequence[Concept], targets: Sequence[str]
) -> tuple[AbstractContextManager[Any], list[str]]:
    """The exact sum of the ordinary LoRAs in ``folder`` of those ``concepts`` that have one
    (``{name}.safetensors``, lora_baseline.py's format), each reading the registry's token."""
    from lora_baseline import COMBINATIONS, LoraConcept, merged_delta
    from safetensors.torch import load_file

    from blockctl.apply import deltas_applied

    have = [c for c in concepts if (folder / f"{c.name}.safetensors").is_file()]
    if not have:
        raise ValueError(f"no LoRA of any of the concepts in {folder}")
    loras = [
        LoraConcept(c.name, c.token, c.class_word, folder / f"{c.name}.safetensors") for c in have
    ]
    rows = [(c.token, load_file(str(c.path))["token"].reshape(1, -1)) for c in loras]
    delta = merged_delta(base_dir, loras, targets, COMBINATIONS["lora-sum"], seed=0)
    return deltas_applied(base, delta, rows), [c.name for c in have]


@contextmanager
def timed(label: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)


Grid = tuple[list[list[Any]], list[str]]


def select(args: argparse.Namespace) -> tuple[Any, list[Concept], list[Pair]]:
    """The registry, the N concepts to merge and the pairs to ask about; ValueError if the
    request cannot be measured."""
    from blockctl.toy.concepts import CONCEPTS
    from registry import open_registry

    reg = open_registry(args.registry)
    if not reg.exists():
        raise ValueError(f"no registry at {args.registry}")
    published = [a.concept for a in reg.adapters()]
    names = args.concepts.split(",") if args.concepts else published
    unknown = [n for n in names if n not in published]
    if unknown:
        raise ValueError(f"not published in {args.registry}: {', '.join(unknown)}")
    no_recogniser = [n for n in names if n not in CONCEPTS]
    if no_recogniser:
        raise ValueError(f"no recogniser for {', '.join(no_recogniser)} (toy concepts only)")
    records = {r.concept: r for r in reg.slots()}
    concepts = [
        Concept(n, records[n].token, records[n].class_word, CONCEPTS[n].kind) for n in names
    ]
    pairs = (
        parse_pairs(args.pairs, {c.name: c for c in concepts})
        if args.pairs
        else default_pairs(concepts)
    )
    if not pairs:
        raise ValueError("no pair of different kinds among these concepts")
    return reg, concepts, pairs


@dataclass(frozen=True)
class Models:
    """Every model's answers: the base (predictions only), (a), (b) per pair prompt, (c)."""

    base: Measured
    merged: Measured
    pair_only: dict[str, Measured]
    lora: Measured | None
    lora_names: list[str]


def sample_models(
    args: argparse.Namespace, reg: Any, concepts: list[Concept], pairs: list[Pair]
) -> Models:
    from lora_baseline import unet_targets

    from blockctl.apply import Modules, applied
    from blockctl.base_model import resolve_base
    from blockctl.evaluate import EvalConfig, Probe, renderer
    from blockctl.layout import layout_of
    from blockctl.merge import plan_merge

    base_dir = resolve_base(layout_of(reg).base)
    base = Modules.load(base_dir)
    config = EvalConfig(
        samples=args.samples,
        seed=args.seed,
        images=args.images,
        sample_steps=args.steps,
        guidance=args.guidance,
    )
    probe = Probe(base, base_dir / "scheduler", config)
    render = renderer(base_dir, config)
    prompts = [p.prompt() for p in pairs]
    with timed("base predictions"):
        base_m = measure(base, prompts, probe, None)  # the distance's reference; no images
    names = [c.name for c in concepts]
    with timed(f"(a) merge of all {len(names)}"), applied(plan_merge(reg, names, {}), base) as m:
        merged = measure(m, prompts, probe, render)
    pair_only: dict[str, Measured] = {}
    for p, prompt in zip(pairs, prompts, strict=True):
        plan = plan_merge(reg, list(p.names), {})
        with timed(f"(b) merge of {'+'.join(p.names)}"), applied(plan, base) as m:
            pair_only[prompt] = measure(m, [prompt], probe, render)
    if not args.lora:
        return Models(base_m, merged, pair_only, None, [])
    with timed("(c) lora-sum"):
        ctx, lora_names = lora_model(base, base_dir, args.lora, concepts, unet_targets(reg))
        with ctx as m:
            lora = measure(m, prompts, probe, render)
    return Models(base_m, merged, pair_only, lora, lora_names)


def table(
    rec: Any, models: Models, pairs: list[Pair], n: int, guidance: float
) -> tuple[list[dict[str, Any]], Grid]:
    """One row per pair and method (a pair with a concept that has no LoRA gets a ``skipped``
    lora-sum row), and the grid: per pair, rows (b), (a), (c)."""
    rows: list[dict[str, Any]] = []
    grid_rows: list[list[Any]] = []
    captions: list[str] = []
    for p in pairs:
        prompt = p.prompt()
        b = models.pair_only[prompt]
        b_both, _ = recognition(rec, b.images[prompt], p)
        methods: list[tuple[str, str, int, Measured | None]] = [
            (PAIR, "(b) the pair's merge", 2, b),
            (ALL, f"(a) merge of all {n}", n, models.merged),
        ]
        if models.lora is not None:
            missing = sorted(set(p.names) - set(models.lora_names))
            label = f"(c) lora-sum of {len(models.lora_names)}"
            methods.append((LORA, label, len(models.lora_names), None if missing else models.lora))
        for method, label, size, model in methods:
            row: dict[str, Any] = {
                "method": method,
                "n": size,
                "pair": list(p.names),
                "kinds": p.kinds,
                "prompt": prompt,
            }
            if model is None:
                rows.append({**row, "skipped": "no LoRA of " + " or ".join(missing)})
                continue
            both, each = recognition(rec, model.images[prompt], p)
            rows.append(
                {
                    **row,
                    "both_recognised": both,
                    "each_recognised": each,
                    "pair_only_both_recognised": b_both,
                    **distance(model, b, models.base, prompt, guidance),
                    "images": len(model.images[prompt]),
                }
            )
            # twice the size, pixels kept: the samples as they are, captions that fit
            grid_rows.append(
                [im.resize((128, 128), Resampling.NEAREST) for im in model.images[prompt]]
            )
            captions.append(f"{label}: both {both:.2f}  |  {prompt}")
            print(
                f"{'+'.join(p.names):>16} {method:>14}: both {both:.2f} each "
                + " ".join(f"{k} {v:.2f}" for k, v in each.items())
                + f"  distance {rows[-1]['function_space_distance']:.3f}",
                flush=True,
            )
    return rows, (grid_rows, captions)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Grid]:
    import torch
    from recognise import calibrate

    torch.set_num_threads(args.threads)
    reg, concepts, pairs = select(args)
    with timed("recogniser calibrated"):
        rec = calibrate()
    models = sample_models(args, reg, concepts, pairs)
    rows, grid = table(rec, models, pairs, len(concepts), args.guidance)
    names = [c.name for c in concepts]
    return {
        "smoke": args.smoke,
        "run": None,  # filled by main
        "registry": str(args.registry),
        "lora": str(args.lora) if args.lora else None,
        "concepts": names,
        "n": len(names),
        "lora_concepts": models.lora_names,
        "settings": {
            "images": args.images,
            "seed": args.seed,
            "sample_steps": args.steps,
            "guidance": args.guidance,
            "probe_samples": args.samples,
        },
        "recogniser_thresholds": {n: round(rec.thresholds[n], 4) for n in names},
        "summary": summarise(rows),
        "rows": rows,
    }, grid


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method: samples with both concepts recognised (count and share) and the mean distance
    over the pairs it was measured on; and the issue's two targets for the merge of all N
    (the second on the pairs lora-sum was measured on: those whose concepts both have a LoRA)."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "both_recognised" in r:
            methods.setdefault(r["method"], []).append(r)

    def pooled(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        both = sum(round(r["both_recognised"] * r["images"]) for r in rs)
        samples = sum(r["images"] for r in rs)
        return {
            "pairs": len(rs),
            "samples": samples,
            "both": both,
            "both_recognised": both / samples,
            "function_space_distance": float(np.mean([r["function_space_distance"] for r in rs])),
        }

    out: dict[str, Any] = {m: pooled(rs) for m, rs in methods.items()}
    if ALL in out and PAIR in out:
        ours, pair_only = out[ALL]["both_recognised"], out[PAIR]["both_recognised"]
        out["targets"] = {
            "merge_vs_pair_only": ours / pair_only if pair_only else None,
            "at_least_0.9_of_pair_only": ours >= 0.9 * pair_only,
        }
        if LORA in out:
            shared = {tuple(r["pair"]) for r in methods[LORA]}
            ours_shared = pooled([r for r in methods[ALL] if tuple(r["pair"]) in shared])
            out["targets"]["merge_on_lora_pairs"] = ours_shared["both_recognised"]
            out["targets"]["above_lora_sum"] = (
                ours_shared["both_recognised"] > out[LORA]["both_recognised"]
            )
    return out


def main() -> None:
    from bench_meta import RESULTS, run_meta

    from blockctl.errors import BlockctlError
    from blockctl.sample import make_grid

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--registry", required=True, help="a registry of trained toy concepts")
    parser.add_argument(
        "--lora", type=Path, help="folder of ordinary LoRAs ({concept}.safetensors)"
    )
    parser.add_argument("--concepts", help="comma list: the N merged (default: all published)")
    parser.add_argument("--pairs", help="comma list of a+b (default: 2 of each kind of pair)")
    parser.add_argument("--images", type=int, default=4, help="samples per pair and method")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=16, help="probe latents")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="mark the result as a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS / "composition.json")
    parser.add_argument("--grid", type=Path, default=RESULTS / "composition.png")
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be positive")
    if args.lora is not None and not args.lora.is_dir():
        parser.error(f"--lora {args.lora} is not a folder")
    meta = run_meta()  # the code that runs, not what the checkout holds when it ends
    try:
        result, (grid_rows, captions) = run(args)
    except ValueError as e:  # a pair or concept list that cannot be measured
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BlockctlError as e:  # the registry's own complaints, with its exit codes
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    result["run"] = meta
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    make_grid(grid_rows, captions).save(args.grid)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {args.grid}")


if __name__ == "__main__":
    main()
