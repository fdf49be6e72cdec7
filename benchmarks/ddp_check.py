"""One concept trained by one process and by two (``accelerate launch``, DDP over gloo on the
CPU), compared: how far apart the adapters end, and what each run took.

    python benchmarks/ddp_check.py [--concept rex] [--steps 100] [--work DIR]

Both runs are the real command line, with ``OMP_NUM_THREADS=1`` per process, on the toy base
with the default settings (batch 2: each process trains on one photo per step). Writes
benchmarks/results/ddp_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_meta import RESULTS, run_meta

from blockctl.adapter import load_adapter
from blockctl.initialize import init_registry
from blockctl.toy.concepts import CONCEPTS
from registry import open_registry

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = (
    "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
)  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip


def demo_photos(folder: Path, concept: str) -> Path:
    """The demo concept's 12 photos (seed 0), as ``blockctl toy-photos`` renders them."""
    command = [sys.executable, "-m", "blockctl", "toy-photos", str(folder), "--concept", concept]
    subprocess.run(command, env=env(), check=True, capture_output=True)
    return folder


def train(processes: int, reg: Path, photos: Path, out: Path, concept: str, steps: int) -> dict:
    launcher = ["-m", "blockctl"]
    if processes > 1:
        launcher = [*LAUNCH, "--num_processes", str(processes), "-m", "blockctl"]
    command = [sys.executable, *launcher, "--registry", str(reg), "train", str(photos),
               "--concept", concept, "--steps", str(steps), "--out", str(out),
               "--no-publish", "--no-sample", "--json"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{processes}-process run failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    return {"wall_seconds": round(wall, 1), "train_seconds": result["seconds"],
            "final_loss": result["final_loss"], "adapter": result["adapter"]}  # fmt: skip


def compare(one: Path, two: Path) -> dict[str, Any]:
    a, b = load_adapter(one), load_adapter(two)
    blocks = [k for k in a.tensors if k.endswith("lora_B.weight")]
    [token] = [k for k in a.tensors if k.startswith("token_embedding.")]

    def worst(keys: list[str]) -> float:
        return max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in keys)

    def largest(keys: list[str]) -> float:
        return max(float(a.tensors[k].abs().max()) for k in keys)

    def relative(keys: list[str]) -> float:
        diff = sum(float((a.tensors[k] - b.tensors[k]).pow(2).sum()) for k in keys)
        size = sum(float(a.tensors[k].pow(2).sum()) for k in keys)
        return (diff / size) ** 0.5

    return {
        "processes_recorded": [a.meta.training["processes"], b.meta.training["processes"]],
        "max_abs_dB": worst(blocks),
        "max_abs_B": largest(blocks),
        "relative_norm_dB": relative(blocks),
        "max_abs_d_token_row": worst([token]),
        "max_abs_token_row": largest([token]),
        "relative_norm_d_token_row": relative([token]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="rex", choices=sorted(CONCEPTS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ddp-check-"))
    reg_path = work / "registry"
    reg = open_registry(str(reg_path))
    layout = init_registry(reg, "toy")
    spec = CONCEPTS[args.concept]
    reg.reserve(args.concept, f"<{args.concept}>", spec.class_word, "ddp-check")
    photos = demo_photos(work / "photos", args.concept)
    runs = {}
    for processes in (1, 2):
        out = work / f"{processes}-process"
        runs[f"{processes}_process"] = train(
            processes, reg_path, photos, out, args.concept, args.steps
        )
        print(f"{processes} process(es): {runs[f'{processes}_process']}", flush=True)
    difference = compare(Path(runs["1_process"]["adapter"]), Path(runs["2_process"]["adapter"]))
    report = {
        "what": "one concept trained by 1 process and by 2 (accelerate launch --multi_gpu "
        "--num_processes 2 on a machine without GPUs: torchrun, DDP over gloo), same settings "
        "and seed; each process OMP_NUM_THREADS=1",
        "base": "toy",
        "layout": f"{layout.preset}, rank {layout.rank}, {layout.slots} slots",
        "concept": args.concept,
        "steps": args.steps,
        "settings": "defaults (batch 2: one photo per process per step; the one erasure "
        "prompt goes whole to each process)",
        "runs": {k: {x: y for x, y in v.items() if x != "adapter"} for k, v in runs.items()},
        "difference": difference,
        **run_meta(),
    }
    path = RESULTS / "ddp_check.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(difference, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
