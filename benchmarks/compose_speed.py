"""Switching concepts in one loaded pipeline: ``blockctl.compose`` vs diffusers' ``set_adapters``,
on the SD-1.5-shaped random fp16 pipeline that merge_speed.py builds (its builders, imported).

With 15 and then 60 published rank-4 concepts, in one run:

(a) switch time: to a new random subset of 5 and of 15 concepts, ``Composer.set`` (every
    targeted weight recomputed from the kept originals, the tokens' rows and tokenizer
    included) vs ``pipe.set_adapters`` with the same concepts loaded as LoRAs
    (``load_lora_weights`` ×N of blockctl's one-concept LoRA exports; their tokens are left
    out, which only spares diffusers work). Same subsets, same order, weights in fp16;
(b) one UNet forward with a subset active (60 loaded): blockctl (composed weights), diffusers
    unfused (LoRA layers active) and the bare base (the Composer restored, bit for bit). fp16
    convolutions on a CPU are impractical (a 32×32 forward took 164 s here), so on a CPU the
    UNets are cast to float32 for the forwards, every variant alike;
(c) peak RSS of each contender alone in its own process (VmHWM after loading the pipeline and
    the concepts and switching), against the bare pipeline's.

Timings of both contenders come from one process holding two copies of the pipeline, their
switches and forwards interleaved, so the changing load of a shared machine hits both alike.
Exactness: after ``restore`` every targeted weight equals the base's file (max |W − W_base|).
One thread (``torch.set_num_threads(1)``); wall and CPU time (``process_time``) are both
recorded, the CPU time being the fairer measure on a machine other processes load. Usage::

    python benchmarks/compose_speed.py [--work /tmp/compose-bench] [--switches 20]
        [--forwards 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_meta import git_commit, versions  # noqa: E402 - siblings, importable by the path above
from merge_speed import (  # noqa: E402
    build_base,
    build_registry,
    peak_rss_bytes,
    run_child,
    warm,
)

SUBSET_SIZES = (5, 15)
LOADED = (15, 60)
FORWARD_AT = 60  # loaded concepts when the forwards are timed (the stress case)
LATENT = 64  # SD 1.5's 512×512 images (--latent changes it, for quick checks of the script)
_CHILD = "import sys; sys.path.insert(0, 'benchmarks'); import compose_speed; compose_speed.child()"


def concepts(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]  # as merge_speed.build_registry names them


def subsets(n: int, switches: int, seed: int) -> dict[int, list[list[str]]]:
    """Random subsets, ``switches`` per size, drawn from the first ``n`` concepts."""
    rng = random.Random(seed * 1000 + n)
    return {k: [rng.sample(concepts(n), k) for _ in range(switches)] for k in SUBSET_SIZES}


def load_fp16(base: Path, device: str) -> Any:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )

    from blockctl.quiet import quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(
        base,
        torch_dtype=torch.float16,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


def load_loras(pipe: Any, loras: Path, n: int) -> None:
    for name in concepts(n):
        pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)


def timed(device: str, fn: Any, *args: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared CPU the CPU time is the fairer
    measure of work: waiting for a core another process holds is not counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


class Times:
    """Wall and CPU seconds per label."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, label: str, measured: tuple[float, float]) -> None:
        self.wall.setdefault(label, []).append(measured[0])
        self.cpu.setdefault(label, []).append(measured[1])

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        return {"wall": self.wall, "cpu": self.cpu}


class Forward:
    """One UNet forward on fixed inputs (batch 1, latent×latent, 77 tokens), timed."""

    def __init__(self, unet: Any, device: str, latent: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.unet, self.device = unet, device
        self.x = torch.randn(1, 4, latent, latent, generator=gen).to(device, unet.dtype)
        self.ctx = torch.randn(1, 77, 768, generator=gen).to(device, unet.dtype)

    @torch.no_grad()
    def __call__(self) -> tuple[float, float]:
        return timed(self.device, self.unet, self.x, 500, self.ctx)


def restore_error(composer: Any, pipe: Any, base: Path) -> float:
    """max |W − W_base| over the targets, W_base read from the base's files."""
    from blockctl.base_model import BaseFolder

    stored = BaseFolder(base)
    error = 0.0
    for t in composer.layout.targets:
        part = pipe.unet if t.component == "unet" else pipe.text_encoder
        live = part.get_submodule(t.module).weight.detach().float().cpu()
        want = stored.read(t.component, f"{t.module}.weight").float()
        error = max(error, float((live - want).abs().max()))
    return error


def child_timing(
    base: Path,
    reg: str,
    loras: Path,
    n: int,
    switches: int,
    forwards: int,
    device: str,
    latent: int,
) -> dict[str, Any]:
    """Both contenders in one process, each on its own copy of the pipeline, interleaved."""
    from blockctl.compose import Composer

    ours = load_fp16(base, device)
    tokenizer = ours.tokenizer
    composer = Composer(ours, reg)
    composer.load(concepts(n))
    theirs = load_fp16(base, device)
    load_loras(theirs, loras, n)
    runs = subsets(n, switches, seed=0)
    first = runs[SUBSET_SIZES[0]][0]
    composer.set(first)  # warm-ups, not timed
    theirs.set_adapters(first, [1.0] * len(first))
    switch = Times()
    for k in SUBSET_SIZES:
        for i, subset in enumerate(runs[k]):
            turns = [
                (f"blockctl_{k}", composer.set, (subset,)),
                (f"diffusers_{k}", theirs.set_adapters, (subset, [1.0] * k)),
            ]
            for label, fn, args in turns if i % 2 == 0 else turns[::-1]:
                switch.add(label, timed(device, fn, *args))
    composer.restore()
    out: dict[str, Any] = {
        "switch_seconds": switch.to_dict(),
        "restore_max_abs_error": restore_error(composer, ours, base),
        "restore_tokenizer_is_original": ours.tokenizer is tokenizer,
    }
    if forwards:
        dtype = torch.float32 if device == "cpu" else torch.float16  # see the module docstring
        ours.unet.to(dtype)
        theirs.unet.to(dtype)
        mine_fwd = Forward(ours.unet, device, latent)
        their_fwd = Forward(theirs.unet, device, latent)
        mine_fwd()  # warm-ups
        their_fwd()

        def variant(label: str) -> tuple[float, float]:
            kind, _, size = label.partition("_")
            if kind == "base":
                composer.restore()
                return mine_fwd()
            if kind == "blockctl":
                composer.set(runs[int(size)][0])
                return mine_fwd()
            theirs.set_adapters(runs[int(size)][0], [1.0] * int(size))
            return their_fwd()

        labels = ["base"] + [
            f"{who}_{k}" for k in SUBSET_SIZES for who in ("blockctl", "diffusers")
        ]
        fwd = Times()
        for r in range(forwards):  # interleaved, in an order rotated every round
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                fwd.add(label, variant(label))
        composer.restore()
        out["forward_seconds"] = fwd.to_dict()
        out["forward_dtype"] = str(dtype).removeprefix("torch.")
    return out


def child_memory(variant: str, base: Path, where: Path, n: int, device: str) -> dict[str, Any]:
    """One contender alone in its process: its load time, and its peak RSS after loading
    ``n`` concepts and switching six times."""
    pipe = load_fp16(base, device)
    out: dict[str, Any] = {"rss_pipeline_bytes": peak_rss_bytes()}
    runs = [s for ss in subsets(n, 3, seed=1).values() for s in ss] if n else []
    start = time.perf_counter()
    if variant == "blockctl":
        from blockctl.compose import Composer

        composer = Composer(pipe, str(where))
        composer.load(concepts(n))
        out["load_seconds"] = time.perf_counter() - start
        for subset in runs:
            composer.set(subset)
    elif variant == "diffusers":
        load_loras(pipe, where, n)
        out["load_seconds"] = time.perf_counter() - start
        for subset in runs:
            pipe.set_adapters(subset, [1.0] * len(subset))
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def child() -> None:
    """Entry point of the subprocesses (see ``main``)."""
    torch.set_num_threads(1)
    kind, *rest = sys.argv[1:]
    if kind == "timing":
        base, reg, loras, n, switches, forwards, device, latent = rest
        report = child_timing(
            Path(base), reg, Path(loras), int(n), int(switches), int(forwards), device, int(latent)
        )
    else:
        base, where, n, device = rest
        report = child_memory(kind, Path(base), Path(where), int(n), device)
    print(json.dumps(report))


def summary(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(seconds), 5),
        "median": round(statistics.median(seconds), 5),
        "best": round(min(seconds), 5),
        "worst": round(max(seconds), 5),
    }


def compare(switch: dict[str, list[float]]) -> dict[str, Any]:
    """Switch-time summaries and how many times faster blockctl is (mean/mean, worst/worst)."""
    out = {}
    for k in SUBSET_SIZES:
        ours, theirs = switch[f"blockctl_{k}"], switch[f"diffusers_{k}"]
        out[f"subset_{k}"] = {
            "blockctl": summary(ours),
            "diffusers_set_adapters": summary(theirs),
            "speedup_mean": round(statistics.fmean(theirs) / statistics.fmean(ours), 2),
            "speedup_median": round(statistics.median(theirs) / statistics.median(ours), 2),
            "speedup_worst": round(max(theirs) / max(ours), 2),
        }
    return out


def forward_table(times: dict[str, list[float]]) -> dict[str, Any]:
    base = times["base"]
    out: dict[str, Any] = {"bare_base": summary(base)}
    for k in SUBSET_SIZES:
        ours, theirs = times[f"blockctl_{k}"], times[f"diffusers_{k}"]
        out[f"subset_{k}"] = {
            "blockctl": summary(ours),
            "diffusers_unfused": summary(theirs),
            "blockctl_vs_base_median": round(statistics.median(ours) / statistics.median(base), 3),
            "blockctl_vs_base_mean": round(statistics.fmean(ours) / statistics.fmean(base), 3),
            "blockctl_vs_base_worst": round(max(ours) / max(base), 3),
            "diffusers_vs_base_median": round(
                statistics.median(theirs) / statistics.median(base), 3
            ),
            "diffusers_vs_base_mean": round(statistics.fmean(theirs) / statistics.fmean(base), 3),
            "diffusers_vs_base_worst": round(max(theirs) / max(base), 3),
        }
    return out


def export_loras(reg_path: Path, out: Path, n: int) -> Path:
    """Each concept as an ordinary rank-4 LoRA (peft keys), blockctl's own export."""
    from blockctl.merge import MergeOptions, merge
    from registry import open_registry

    out.mkdir(exist_ok=True)
    reg = open_registry(str(reg_path))
    for name in concepts(n):
        path = out / f"{name}.safetensors"
        if not path.exists():
            merge(reg, [name], MergeOptions(out=path, format="lora", lora_keys="peft"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compose-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compose_speed.json")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--forwards", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU run")
    parser.add_argument("--latent", type=int, default=LATENT, help="latent side of the forwards")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = build_base(work)
    reg_path = build_registry(work, base, max(LOADED))
    loras = export_loras(reg_path, work / "loras", max(LOADED))
    setup = time.perf_counter() - start
    warm(base)
    dev = args.device

    def run(*child_args: object) -> dict[str, Any]:
        report = run_child(_CHILD, *(str(a) for a in child_args))
        wall = report["wall_with_imports"]
        print(f"{' '.join(map(str, child_args[:1]))}: {wall:.0f} s", file=sys.stderr)
        return report

    bare = run("base", base, base, 0, dev)
    memory = {
        n: {
            "blockctl": run("blockctl", base, reg_path, n, dev),
            "diffusers": run("diffusers", base, loras, n, dev),
        }
        for n in LOADED
    }
    timing = {}
    for n in LOADED:
        forwards = args.forwards if n == FORWARD_AT else 0
        timing[n] = run(
            "timing", base, reg_path, loras, n, args.switches, forwards, dev, args.latent
        )
    at = timing[FORWARD_AT]
    result = {
        "what": "switching concepts in one loaded SD-1.5-shaped fp16 pipeline (random weights, "
        "cross-kv preset: 32 targets, 19.2M weights; rank 4): blockctl Composer.set vs "
        "diffusers set_adapters with the same concepts loaded as LoRAs; one UNet forward with "
        "a subset active; peak RSS",
        "git_commit": git_commit(),
        "versions": versions(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": 1,
            "device": dev,
        },
        "settings": {
            "loaded_concepts": list(LOADED),
            "subset_sizes": list(SUBSET_SIZES),
            "switches_per_size": args.switches,
            "weights_dtype_while_switching": "float16",
            "forward": {
                "loaded_concepts": FORWARD_AT,
                "dtype": at.get("forward_dtype"),
                "note": "on a CPU the UNets are cast to float32 after the switching phase, "
                "every variant alike (fp16 convolutions on a CPU are impractical)",
                "latents": [1, 4, args.latent, args.latent],
                "text_tokens": 77,
                "repeats": args.forwards,
            },
        },
        "switch_seconds": {
            clock: {f"loaded_{n}": compare(t["switch_seconds"][clock]) for n, t in timing.items()}
            for clock in ("wall", "cpu")
        },
        "forward_seconds": {
            clock: forward_table(at["forward_seconds"][clock]) for clock in ("wall", "cpu")
        }
        if args.forwards
        else {},
        "peak_rss_bytes": {
            "bare_pipeline": bare["peak_rss_bytes"],
            **{
                f"loaded_{n}": {
                    "blockctl": m["blockctl"]["peak_rss_bytes"],
                    "diffusers": m["diffusers"]["peak_rss_bytes"],
                    "blockctl_over_bare": m["blockctl"]["peak_rss_bytes"] - bare["peak_rss_bytes"],
                    "diffusers_over_bare": m["diffusers"]["peak_rss_bytes"]
                    - bare["peak_rss_bytes"],
                }
                for n, m in memory.items()
            },
            "note": "VmHWM of each contender alone in its own process after loading the pipeline "
            "(fp16) and N concepts and switching 6 times; Python and library imports included",
        },
        "load_seconds": {
            f"loaded_{n}": {
                "blockctl_composer_load": round(m["blockctl"]["load_seconds"], 3),
                "diffusers_load_lora_weights": round(m["diffusers"]["load_seconds"], 3),
            }
            for n, m in memory.items()
        },
        "restore": {
            f"loaded_{n}": {
                "max_abs_error": t["restore_max_abs_error"],
                "tokenizer_is_original": t["restore_tokenizer_is_original"],
            }
            for n, t in timing.items()
        },
        "targets": {
            "switch_speedup_at_60_min": 20.0,
            "forward_vs_base_max": 1.02,
            "restore_max_abs_error": 0.0,
        },
        "raw": {"timing": timing, "memory": memory, "bare": bare},
        "setup_seconds": round(setup, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ("switch_seconds", "forward_seconds", "peak_rss_bytes", "load_seconds", "restore")
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
