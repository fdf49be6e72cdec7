"""Switching concepts in one loaded pipeline: ``blockctl.compose`` in its two modes vs diffusers'
``set_adapters``, on the SD-1.5-shaped random fp16 pipeline that merge_speed.py builds (its
builders, imported).

With 15 and then 60 published rank-4 concepts, in one run:

(a) switch time: to a new random subset of 5 and of 15 concepts, ``Composer.set`` in fuse mode
    (every targeted weight recomputed from the kept originals) and in branch mode (one mask
    written; the weights untouched), the tokens' rows and tokenizer included in both, vs
    ``pipe.set_adapters`` with the same concepts loaded as LoRAs (``load_lora_weights`` ×N of
    blockctl's one-concept LoRA exports; their tokens are left out, which only spares diffusers
    work). Same subsets, same order, weights in fp16;
(b) one UNet forward with a subset active (60 loaded): fuse mode (composed weights), branch
    mode (the low-rank branch on the 77 text tokens), diffusers unfused (LoRA layers active) and
    the bare base (the fuse Composer restored, bit for bit). fp16 convolutions on a CPU are
    impractical (a 32×32 forward took 164 s here), so on a CPU the UNets are cast to float32 for
    the forwards, every variant alike. Whole forwards vary by ±10% on a shared machine, so the
    32 targeted layers are also timed alone on the prompt encoding (batch 1 and 2), bare, with
    the branch and with diffusers' LoRA layers: the difference is what each adds to a forward;
(c) peak RSS of each contender alone in its own process (VmHWM after loading the pipeline and
    the concepts and switching), against the bare pipeline's;
(d) after ``restore``: max |W − W_base| over the targets against the base's files, and whether
    the tokenizer and every UNet module are the objects that were loaded.

Timings of the contenders come from one process holding three copies of the pipeline, their
switches and forwards interleaved in rotating order, so the changing load of a shared machine
hits all alike. One thread (``torch.set_num_threads(1)``); wall and CPU time (``process_time``)
are both recorded, the CPU time being the fairer measure on a machine other processes load.
Usage::

    python benchmarks/compose_speed.py [--work /tmp/compose-bench] [--switches 20]
        [--forwards 4] [--device cpu|cuda]
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

from bench_meta import RESULTS, git_commit, versions  # noqa: E402 - siblings, importable by the path above
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


def restore_check(composer: Any, pipe: Any, base: Path, modules: dict[str, Any]) -> dict[str, Any]:
    """After ``restore``: max |W − W_base| over the targets (W_base read from the base's
    files), whether the tokenizer and every UNet module are the very objects loaded."""
    from blockctl.base_model import BaseFolder

    stored = BaseFolder(base)
    error = 0.0
    for t in composer.layout.targets:
        part = pipe.unet if t.component == "unet" else pipe.text_encoder
        live = part.get_submodule(t.module).weight.detach().float().cpu()
        want = stored.read(t.component, f"{t.module}.weight").float()
        error = max(error, float((live - want).abs().max()))
    now = dict(pipe.unet.named_modules())
    return {
        "max_abs_error": error,
        "tokenizer_is_original": pipe.tokenizer is modules["tokenizer"],
        "unet_modules_are_original": now.keys() == modules["unet"].keys()
        and all(now[k] is m for k, m in modules["unet"].items()),
    }


def loaded_state(pipe: Any) -> dict[str, Any]:
    return {"tokenizer": pipe.tokenizer, "unet": dict(pipe.unet.named_modules())}


def branch_layers(pipe: Any, targets: Sequence[Any]) -> list[Any]:
    return [pipe.unet.get_submodule(t.module) for t in targets]


def layer_seconds(
    device: str, layers: Sequence[Any], ctx: torch.Tensor, repeats: int
) -> list[float]:
    """Seconds of each of ``repeats`` passes over ``layers`` on the prompt encoding ``ctx``:
    what the targets cost in one UNet forward (a branch's input cache emptied first, as by a
    switch)."""
    banks = {id(b): b for b in (getattr(m, "bank", None) for m in layers) if b is not None}
    runs = []
    with torch.no_grad():
        for _ in range(repeats):
            for bank in banks.values():
                bank.forget_inputs()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for layer in layers:
                layer(ctx)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
    return runs


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
    """The three contenders in one process, each on its own copy of the pipeline, interleaved."""
    from blockctl.compose import Composer

    fused = load_fp16(base, device)
    fused_state = loaded_state(fused)
    fuse = Composer(fused, reg)
    fuse.load(concepts(n))
    branched = load_fp16(base, device)
    branched_state = loaded_state(branched)
    branch = Composer(branched, reg, mode="branch")
    branch.load(concepts(n))
    theirs = load_fp16(base, device)
    load_loras(theirs, loras, n)
    runs = subsets(n, switches, seed=0)
    first = runs[SUBSET_SIZES[0]][0]
    fuse.set(first)  # warm-ups, not timed
    branch.set(first)
    theirs.set_adapters(first, [1.0] * len(first))
    switch = Times()
    for k in SUBSET_SIZES:
        for i, subset in enumerate(runs[k]):
            turns = [
                (f"fuse_{k}", fuse.set, (subset,)),
                (f"branch_{k}", branch.set, (subset,)),
                (f"diffusers_{k}", theirs.set_adapters, (subset, [1.0] * k)),
            ]
            for label, fn, args in turns[i % 3 :] + turns[: i % 3]:  # rotated every switch
                switch.add(label, timed(device, fn, *args))
    fuse.restore()
    branch.restore()
    out: dict[str, Any] = {
        "switch_seconds": switch.to_dict(),
        "restore": {
            "fuse": restore_check(fuse, fused, base, fused_state),
            "branch": restore_check(branch, branched, base, branched_state),
        },
    }
    if forwards:
        dtype = torch.float32 if device == "cpu" else torch.float16  # see the module docstring
        if dtype != fused.unet.dtype:
            for pipe in (fused, branched, theirs):
                pipe.unet.to(dtype)
            # A branch's tensors are made in the pipeline's dtype: a new Composer for the new one.
            branch = Composer(branched, reg, mode="branch")
            branch.load(concepts(n))
        fuse_fwd = Forward(fused.unet, device, latent)
        branch_fwd = Forward(branched.unet, device, latent)
        their_fwd = Forward(theirs.unet, device, latent)
        fuse_fwd()  # warm-ups
        branch.set(first)
        branch_fwd()
        their_fwd()

        def variant(label: str) -> tuple[float, float]:
            kind, _, size = label.partition("_")
            if kind == "base":
                fuse.restore()
                return fuse_fwd()
            subset = runs[int(size)][0]
            if kind == "fuse":
                fuse.set(subset)
                return fuse_fwd()
            if kind == "branch":
                branch.set(subset)
                return branch_fwd()
            theirs.set_adapters(subset, [1.0] * int(size))
            return their_fwd()

        labels = ["base"] + [
            f"{who}_{k}" for k in SUBSET_SIZES for who in ("fuse", "branch", "diffusers")
        ]
        fwd = Times()
        for r in range(forwards):  # interleaved, in an order rotated every round
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                fwd.add(label, variant(label))
        fuse.restore()
        out["forward_seconds"] = fwd.to_dict()
        out["forward_dtype"] = str(dtype).removeprefix("torch.")
        out["target_layer_seconds"] = target_layer_seconds(
            device, fused, branch, branched, theirs, runs, fuse_fwd.ctx
        )
        branch.restore()
    return out


def target_layer_seconds(
    device: str,
    fused: Any,
    branch: Any,
    branched: Any,
    theirs: Any,
    runs: dict[int, list[list[str]]],
    ctx: torch.Tensor,
) -> dict[str, Any]:
    """The 32 targeted layers alone on the prompt encoding (batch 1 and 2, as with guidance),
    many times: the bare Linears, blockctl's branch and diffusers' LoRA layers with a subset
    active. The difference is what the unfused variants add to a forward, measured far more
    precisely than whole forwards on a shared machine can."""
    targets = branch.layout.targets
    out: dict[str, Any] = {}
    for batch in (1, 2):
        prompt = ctx.expand(batch, -1, -1).contiguous()
        row: dict[str, Any] = {
            "bare": layer_seconds(device, branch_layers(fused, targets), prompt, 50)
        }
        for k in SUBSET_SIZES:
            subset = runs[k][0]
            branch.set(subset)
            theirs.set_adapters(subset, [1.0] * k)
            row[f"branch_{k}"] = layer_seconds(device, branch_layers(branched, targets), prompt, 50)
            row[f"diffusers_{k}"] = layer_seconds(
                device, branch_layers(theirs, targets), prompt, 50
            )
        out[f"batch_{batch}"] = row
    return out


def child_memory(variant: str, base: Path, where: Path, n: int, device: str) -> dict[str, Any]:
    """One contender alone in its process: its load time, and its peak RSS after loading
    ``n`` concepts and switching six times."""
    pipe = load_fp16(base, device)
    out: dict[str, Any] = {"rss_pipeline_bytes": peak_rss_bytes()}
    runs = [s for ss in subsets(n, 3, seed=1).values() for s in ss] if n else []
    start = time.perf_counter()
    if variant in ("fuse", "branch"):
        from blockctl.compose import Composer

        composer = Composer(pipe, str(where), mode=variant)
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
        "mean": round(statistics.fmean(seconds), 6),
        "median": round(statistics.median(seconds), 6),
        "best": round(min(seconds), 6),
        "worst": round(max(seconds), 6),
    }


def ratios(mine: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """other ÷ mine by mean, median and worst case (> 1: mine is faster)."""
    return {
        "mean": round(statistics.fmean(other) / statistics.fmean(mine), 3),
        "median": round(statistics.median(other) / statistics.median(mine), 3),
        "worst": round(max(other) / max(mine), 3),
    }


def compare(switch: dict[str, list[float]]) -> dict[str, Any]:
    """Switch-time summaries and how many times faster than ``set_adapters`` each blockctl
    mode is (mean/mean, median/median, worst/worst)."""
    out = {}
    for k in SUBSET_SIZES:
        fuse, branch, theirs = (switch[f"{who}_{k}"] for who in ("fuse", "branch", "diffusers"))
        out[f"subset_{k}"] = {
            "blockctl_fuse": summary(fuse),
            "blockctl_branch": summary(branch),
            "diffusers_set_adapters": summary(theirs),
            "speedup_fuse": ratios(fuse, theirs),
            "speedup_branch": ratios(branch, theirs),
        }
    return out


def forward_table(times: dict[str, list[float]]) -> dict[str, Any]:
    base = times["base"]
    out: dict[str, Any] = {"bare_base": summary(base)}
    for k in SUBSET_SIZES:
        row: dict[str, Any] = {}
        for who, name in (("fuse", "blockctl_fuse"), ("branch", "blockctl_branch"),
                          ("diffusers", "diffusers_unfused")):  # fmt: skip
            row[name] = summary(times[f"{who}_{k}"])
            row[f"{name}_vs_base"] = ratios(base, times[f"{who}_{k}"])
        out[f"subset_{k}"] = row
    return out


def layer_table(layers: dict[str, Any], forward: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds the unfused variants add to the targets' pass, by the best and the median of
    the passes (the best is the least disturbed by other processes); at batch 1 also as a share
    of one bare forward's median (batch 1, as the forwards are timed)."""
    base_fwd = forward["bare_base"]["median"]
    out: dict[str, Any] = {}
    for batch, row in layers.items():
        bare = {"best": min(row["bare"]), "median": statistics.median(row["bare"])}
        out[batch] = {"bare_targets_ms": {k: round(v * 1e3, 3) for k, v in bare.items()}}
        for label, runs in row.items():
            if label == "bare":
                continue
            mine = {"best": min(runs), "median": statistics.median(runs)}
            extra = {k: mine[k] - bare[k] for k in mine}
            out[batch][label] = {
                "targets_ms": {k: round(v * 1e3, 3) for k, v in mine.items()},
                "extra_ms": {k: round(v * 1e3, 3) for k, v in extra.items()},
            }
            if batch == "batch_1":
                out[batch][label]["extra_share_of_forward"] = {
                    k: round(v / base_fwd, 5) for k, v in extra.items()
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
    parser.add_argument("--out", type=Path, default=RESULTS / "compose_speed.json")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--forwards", type=int, default=4)
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
            "fuse": run("fuse", base, reg_path, n, dev),
            "branch": run("branch", base, reg_path, n, dev),
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
    forward = (
        {clock: forward_table(at["forward_seconds"][clock]) for clock in ("wall", "cpu")}
        if args.forwards
        else {}
    )
    result = {
        "what": "switching concepts in one loaded SD-1.5-shaped fp16 pipeline (random weights, "
        "cross-kv preset: 32 targets, 19.2M weights; rank 4): blockctl Composer.set in fuse "
        "mode (weights rewritten) and branch mode (a mask written) vs diffusers set_adapters "
        "with the same concepts loaded as LoRAs; one UNet forward with a subset active; the "
        "targeted layers alone; peak RSS",
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
        "forward_seconds": forward,
        "target_layers": layer_table(at["target_layer_seconds"], forward["wall"])
        if args.forwards
        else {},
        "peak_rss_bytes": {
            "bare_pipeline": bare["peak_rss_bytes"],
            **{
                f"loaded_{n}": {
                    **{who: m[who]["peak_rss_bytes"] for who in m},
                    **{
                        f"{who}_over_bare": m[who]["peak_rss_bytes"] - bare["peak_rss_bytes"]
                        for who in m
                    },
                }
                for n, m in memory.items()
            },
            "note": "VmHWM of each contender alone in its own process after loading the pipeline "
            "(fp16) and N concepts and switching 6 times; Python and library imports included",
        },
        "load_seconds": {
            f"loaded_{n}": {
                "blockctl_fuse_load": round(m["fuse"]["load_seconds"], 3),
                "blockctl_branch_load": round(m["branch"]["load_seconds"], 3),
                "diffusers_load_lora_weights": round(m["diffusers"]["load_seconds"], 3),
            }
            for n, m in memory.items()
        },
        "restore": {f"loaded_{n}": t["restore"] for n, t in timing.items()},
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
    shown = ("switch_seconds", "forward_seconds", "target_layers", "peak_rss_bytes", "restore")
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
