"""``blockctl demo``: the whole story, offline, on the embedded toy base.

Fresh registry → photos of three toy concepts (a subject, a scene, a style) → reserve → train
each in its own slot → verify → merge all three → identity metrics → a sample grid of the base
against the merged model. Everything lands in one folder, which the summary points to.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockctl.errors import InvalidInput, ValidationFailed

Say = Callable[[str], None]
DEFAULT_CONCEPTS = ("rex", "brick", "vangogh")
# A demo marks its OUT with this file; ``--force`` replaces only DEMO_ENTRIES, and only there.
MARKER = ".blockctl-demo"
DEMO_ENTRIES = ("registry", "photos", "runs", "merged", "samples.png", "summary.json")
# Half the trainer's 600: on the toy base a concept's change ‖δ‖² has converged by 300 steps
# (identity sweep, docs/benchmarks.md: 1.6e-2 after 300, 1.5e-2 after 600, with crosstalk
# and prior interference as low), and it keeps a first run within a few minutes on 2 cores.
DEMO_STEPS = 300


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    concepts: tuple[str, ...] = DEFAULT_CONCEPTS
    photos: int = 12
    steps: int = DEMO_STEPS
    seed: int = 0
    sample_steps: int = 15
    force: bool = False


@dataclass(frozen=True)
class DemoResult:
    out: Path
    registry: Path
    merged: Path
    grid: Path
    summary: Path
    metrics: list[dict[str, Any]]
    train_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def prompt_for(kind: str, token: str, class_word: str) -> str:
    """A prompt that shows the concept off: subjects as themselves, scenes behind a known shape,
    styles applied to a known shape."""
    if kind == "scene":
        return f"a red circle on a {token} {class_word}"
    if kind == "style":
        return f"a photo of {token} {class_word} of a blue square"
    return f"a photo of {token} {class_word}"


def _prepare(config: DemoConfig) -> None:
    """Make OUT ready. ``--force`` starts over only in a folder an earlier demo made (it holds
    ``MARKER``), and then removes only the demo's own entries: anything else stays."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not config.force:
            raise InvalidInput(f"{out} is not empty", hint="use --force to start it over")
        if not (out / MARKER).is_file():
            raise InvalidInput(
                f"{out} is not empty and was not made by blockctl demo; --force only replaces "
                "a demo's own output",
                hint="choose a new or empty folder",
            )
        for name in DEMO_ENTRIES:
            _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by blockctl demo; --force may replace its entries\n")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, never what it points to
    elif path.is_dir():
        shutil.rmtree(path)


Progress = Callable[[str], AbstractContextManager[Any]]


def run_demo(config: DemoConfig, say: Say = print, progress: Progress | None = None) -> DemoResult:
    """Run the demo into ``config.out``. ``progress(label)``, if given, makes a context that
    yields the trainer's progress callback for one concept (a live bar with its ETA)."""
    from blockctl.evaluate import EvalConfig, evaluate
    from blockctl.initialize import init_registry
    from blockctl.layout import layout_of
    from blockctl.merge import MergeOptions, merge
    from blockctl.toy.concepts import CONCEPTS, render_concept
    from blockctl.train import TrainRequest, train
    from blockctl.verify import verify_registry
    from registry import open_registry

    unknown = [c for c in config.concepts if c not in CONCEPTS]
    if unknown:
        raise InvalidInput(
            f"unknown demo concept(s): {', '.join(unknown)}",
            hint="known: " + ", ".join(sorted(CONCEPTS)),
        )
    started = time.monotonic()
    _prepare(config)
    out = config.out
    reg_path = out / "registry"
    reg = open_registry(str(reg_path))
    layout = init_registry(reg, "toy")
    say(f"[1/6] registry {reg_path}: {layout.slots} slots of rank {layout.rank} on the toy base")

    timings: dict[str, float] = {}
    for i, name in enumerate(config.concepts, start=1):
        spec = CONCEPTS[name]
        photos = out / "photos" / name
        photos.mkdir(parents=True)
        for j, (img, _) in enumerate(render_concept(name, config.photos, config.seed)):
            img.save(photos / f"{name}_{j:03d}.png")
        rec = reg.reserve(name, f"<{name}>", spec.class_word, "demo")
        say(
            f"[2/6] concept {i}/{len(config.concepts)}: {name} ({spec.kind}) "
            f"→ slot {rec.slot}; training…"
        )
        overrides = {"seed": config.seed, "steps": config.steps}
        request = TrainRequest(
            photos=photos, concept=name, out_dir=out / "runs" / name, overrides=overrides,
            sample=False,  # the demo draws one grid of everything at the end
        )  # fmt: skip
        bar = progress(f"{name} {i}/{len(config.concepts)}") if progress else nullcontext(None)
        with bar as report:
            result = train(reg, request, say=lambda _msg: None, progress=report)
        timings[name] = round(result.seconds, 1)
        say(
            f"      trained {result.steps} steps in {result.seconds:.0f} s, "
            f"published (loss {result.final_loss:.4f})"
        )

    report = verify_registry(reg, layout_of(reg))
    if not report.ok:
        raise ValidationFailed("verify failed: " + json.dumps(report.to_dict()))
    say(
        f"[3/6] verify: {len(report.adapters)} adapters intact and disjoint "
        f"(max |A_s A_tᵀ| = {report.max_cross_product:.1e})"
    )

    merged = out / "merged"
    merge_result = merge(reg, list(config.concepts), MergeOptions(out=merged))
    say(f"[4/6] merged {', '.join(config.concepts)} into {merged} in {merge_result.seconds:.2f} s")

    metrics = [m.to_dict() for m in evaluate(reg, config.concepts, merged, EvalConfig())]
    say(
        "[5/6] identity metrics (retention and sample identity 1 = concept kept; "
        "crosstalk and interference 0 = clean):"
    )
    for m in metrics:
        identity = m.get("sample_identity")
        say(
            f"      {m['concept']:>8}: retention {m['retention']:.3f}  "
            f"crosstalk {m['crosstalk']:.3f}  prior interference {m['prior_interference']:.3f}  "
            f"empty prompt {m['empty_interference']:.3f}  sample identity "
            + ("–" if identity is None else f"{identity:.2f}")
        )

    grid = out / "samples.png"
    _sample_grid(reg, config, merged, grid)
    say(f"[6/6] sample grid: {grid}")

    result_obj = DemoResult(
        out=out, registry=reg_path, merged=merged, grid=grid, summary=out / "summary.json",
        metrics=metrics, train_seconds=timings, seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    result_obj.summary.write_text(json.dumps(summary_dict(result_obj), indent=2) + "\n")
    return result_obj


def summary_dict(result: DemoResult) -> dict[str, Any]:
    return {
        "out": str(result.out),
        "registry": str(result.registry),
        "merged": str(result.merged),
        "grid": str(result.grid),
        "metrics": result.metrics,
        "train_seconds": result.train_seconds,
        "seconds": result.seconds,
    }


def _sample_grid(reg: Any, config: DemoConfig, merged: Path, path: Path) -> None:
    """Rows: each concept's prompt and its class prompt in the merged model, the class prompt in
    the base, and one prompt combining the concepts."""
    from blockctl.sample import generate, load_pipeline, make_grid
    from blockctl.toy import weights_path
    from blockctl.toy.concepts import CONCEPTS

    records = {r.concept: r for r in reg.slots()}
    merged_prompts: list[str] = []
    for name in config.concepts:
        r, kind = records[name], CONCEPTS[name].kind
        merged_prompts += [prompt_for(kind, r.token, r.class_word), f"a photo of a {r.class_word}"]
    combo = _combination(config.concepts, records, CONCEPTS)
    if combo:
        merged_prompts.append(combo)
    base_prompts = [p for p in merged_prompts if "<" not in p]
    merged_rows = generate(
        load_pipeline(merged), merged_prompts, config.seed, config.sample_steps, n=4
    )
    base_rows = generate(
        load_pipeline(weights_path()), base_prompts, config.seed, config.sample_steps, n=4
    )
    rows, captions = [], []
    base_iter = iter(zip(base_prompts, base_rows, strict=True))
    for prompt, row in zip(merged_prompts, merged_rows, strict=True):
        rows.append(row)
        captions.append(f"merged: {prompt}")
        if "<" not in prompt:
            b_prompt, b_row = next(base_iter)
            rows.append(b_row)
            captions.append(f"base:   {b_prompt}")
    make_grid(rows, captions).save(path)


def _combination(
    concepts: tuple[str, ...], records: dict[str, Any], specs: dict[str, Any]
) -> str | None:
    kinds = {specs[c].kind: records[c] for c in concepts}
    subject = kinds.get("subject") or kinds.get("person")
    scene, style = kinds.get("scene"), kinds.get("style")
    if subject is None or (scene is None and style is None):
        return None
    text = f"a photo of {subject.token} {subject.class_word}"
    if scene is not None:
        text += f" on a {scene.token} {scene.class_word}"
    return text
