"""Training-step speed: blockctl's slot adapter (with and without ROE) vs plain peft LoRA.

    python benchmarks/train_speed.py [--base auto|toy|toy-arch|tiny|FOLDER] [--rounds 6]

All variants train the same targets (the registry's cross-attention K/V), at the same rank, on
the same photos, batch size, noise and timesteps (blockctl's per-step draws), with AdamW and
gradient clipping. Rounds interleave the variants so that load from other processes on a
shared machine hits them alike; the median step time of each is reported.

``toy-arch`` is the toy base's architecture with random weights: speed does not depend on
the weights, so it stands in for the toy base before that is shipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_meta import RESULTS, run_meta
from PIL import Image

from blockctl.base_model import resolve_base
from blockctl.layout import build_layout
from blockctl.train import loop
from blockctl.train.components import load_components
from blockctl.train.config import TrainConfig
from blockctl.train.run import Session, TrainRequest, prepare
from registry import open_registry

Step = Callable[[int], None]


def pick_base(spec: str, tmp: Path) -> tuple[Path, str]:
    from blockctl.toy import weights_path
    from blockctl.toy.model import TINY, TOY, build_pipeline, save_pipeline

    if spec == "auto":
        spec = "toy" if (weights_path() / "model_index.json").is_file() else "toy-arch"
    if spec == "toy-arch":
        return save_pipeline(build_pipeline(TOY, seed=0), tmp / "toy-arch"), spec
    if spec == "tiny":
        return save_pipeline(build_pipeline(TINY, seed=0), tmp / "tiny"), spec
    return resolve_base(spec), spec


def write_photos(folder: Path, resolution: int, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def blockctl_step(session: Session) -> Step:
    def step(i: int) -> None:
        loop.train_step(session.inputs, session.accelerator, session.model, session.optimizer, i)

    return step


def peft_step(base_dir: Path, session: Session, rank: int, scale: float) -> Step:
    """Plain LoRA: peft on the same UNet targets, text encoder frozen (no learnt token)."""
    from peft import LoraConfig

    comps = load_components(base_dir)
    for m in (comps.unet, comps.text_encoder, comps.vae):
        m.requires_grad_(False)
    targets = [t.module for t in session.layout.targets if t.component == "unet"]
    config = LoraConfig(r=rank, lora_alpha=round(rank * scale), target_modules=targets)
    comps.unet.add_adapter(config)  # type: ignore[operator]
    comps.unet.train()
    params = [p for p in comps.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = session.inputs
    captions = [p.caption for p in session.photos.photos]
    caption_ids = loop.tokenize(comps.tokenizer, captions)

    def step(i: int) -> None:
        batch = loop.micro_batch(inputs, i, 0, 0)
        noisy, t, target = batch.noisy, batch.timesteps, batch.target
        index = torch.arange(noisy.shape[0]) % caption_ids.shape[0]
        with torch.no_grad():
            cond = comps.text_encoder(caption_ids[index])[0]
        pred = comps.unet(noisy, t, cond).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(variants: dict[str, Step], rounds: int, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm-up: allocator, lazy inits
        for i in range(2):
            step(i)
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for k in range(per_round):
                started = time.perf_counter()
                variants[name](100 + r * per_round + k)
                times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="auto")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="blockctl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base_dir, base_name = pick_base(args.base, tmp)
        basis = tmp / "basis.safetensors"
        layout = build_layout(str(base_dir), base_dir, slots=8, rank=args.rank, basis_path=basis)
        registry = open_registry(str(tmp / "reg"))
        registry.create(layout.to_dict(), basis)
        registry.reserve("rex", "<rex>", "dog", "bench")
        resolution = load_components(base_dir).resolution
        photos = write_photos(tmp / "photos", resolution)
        common = {"batch_size": args.batch_size, "steps": 10_000}

        def session(**overrides: Any) -> Session:
            request = TrainRequest(
                photos=photos,
                concept="rex",
                out_dir=tmp / "out",
                overrides={**common, **overrides},
            )
            return prepare(registry, request, say=lambda m: None)

        plain_session = session(roe=False)
        variants = {
            "plain_lora": peft_step(base_dir, plain_session, args.rank, layout.scale),
            "slot": blockctl_step(plain_session),
            "slot_roe_p1": blockctl_step(session(roe_prob=1.0)),
            "slot_roe_default": blockctl_step(session()),
        }
        times = measure(variants, args.rounds, args.per_round)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    # With p < 1 step times are bimodal (erasure or not): compare means for the default.
    mean = {name: statistics.fmean(ts) for name, ts in times.items()}
    defaults = TrainConfig()
    result = {
        "base": base_name,
        "targets": f"{layout.preset} ({len(layout.targets)} modules), rank {args.rank}",
        "batch_size": args.batch_size,
        "resolution": resolution,
        "device": f"cpu ({torch.get_num_threads()} threads, {platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "steps_per_variant": len(times["slot"]),
        "steps_per_second": {k: round(1 / v, 3) for k, v in mean.items()},
        "median_step_seconds": {k: round(v, 5) for k, v in median.items()},
        "mean_step_seconds": {k: round(v, 5) for k, v in mean.items()},
        "slot_overhead_vs_plain_lora": round(median["slot"] / median["plain_lora"], 3),
        "roe_p1_overhead_vs_plain_lora": round(median["slot_roe_p1"] / median["plain_lora"], 3),
        "roe_default_overhead_vs_plain_lora": round(
            mean["slot_roe_default"] / mean["plain_lora"], 3
        ),
        "roe_default_settings": {
            "roe_prob": defaults.roe_prob,
            "roe_weight": defaults.roe_weight,
            "erasure_batch": defaults.erasure_batch,
        },
        "roe_p1_overhead_vs_slot": round(median["slot_roe_p1"] / median["slot"], 3),
        "targets_ratio": {"slot_overhead": 1.1, "roe_overhead": 1.6},
    }
    result["run"] = run_meta()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # keep the recorded defaults-tuning notes across reruns
        previous = json.loads(args.out.read_text())
        if "defaults_tuning" in previous:
            result["defaults_tuning"] = previous["defaults_tuning"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
