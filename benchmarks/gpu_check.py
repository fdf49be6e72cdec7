"""A short CUDA check of the real code paths: mixed-precision training steps (bf16 and fp16)
through accelerate, publish, verify, merge, verify --merged, and generation on the GPU.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py --out results.json``. On a CPU
machine it runs the same path with ``--mixed-precision no`` (what CI can check). Seeded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_meta import run_meta

from blockctl.evaluate import EvalConfig, evaluate
from blockctl.initialize import init_registry
from blockctl.layout import layout_of
from blockctl.merge import MergeOptions, merge
from blockctl.merged_check import check_merged
from blockctl.toy.concepts import CONCEPTS, render_concept
from blockctl.train import TrainRequest, train
from blockctl.verify import verify_registry
from registry import open_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    precisions = {"rex": "bf16", "brick": "fp16"} if cuda else {"rex": "no", "brick": "no"}
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "train": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reg = open_registry(str(root / "reg"))
        init_registry(reg, "toy")
        for name, precision in precisions.items():
            photos = root / "photos" / name
            photos.mkdir(parents=True)
            for i, (img, _) in enumerate(render_concept(name, 12, 0)):
                img.save(photos / f"{i}.png")
            reg.reserve(name, f"<{name}>", CONCEPTS[name].class_word, "gpu-check")
            overrides = {"steps": args.steps, "mixed_precision": precision}
            # accelerate keeps one process-wide state; a second precision in the same process
            # needs it reset (what accelerate's own tests do)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)
            t0 = time.perf_counter()
            res = train(
                reg,
                TrainRequest(
                    photos=photos,
                    concept=name,
                    out_dir=root / "runs" / name,
                    overrides=overrides,
                    sample=False,
                ),
                say=lambda _m: None,
            )
            result["train"][name] = {  # type: ignore[index]
                "mixed_precision": precision, "seconds": round(time.perf_counter() - t0, 2),
                "steps_per_s": round(res.steps / res.seconds, 2), "final_loss": res.final_loss,
                "published": res.published,
            }  # fmt: skip
        report = verify_registry(reg, layout_of(reg))
        result["verify_ok"] = report.ok
        merged = root / "merged"
        m = merge(reg, list(precisions), MergeOptions(out=merged, dtype="float16"))
        result["merge_seconds"] = round(m.seconds, 3)
        check = check_merged(reg, merged)
        result["verify_merged_ok"] = check.ok
        result["metrics"] = [
            r.to_dict() for r in evaluate(reg, list(precisions), merged, EvalConfig())
        ]
        if cuda:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                merged, torch_dtype=torch.float16, safety_checker=None
            ).to("cuda")
            t0 = time.perf_counter()
            images = pipe(["a photo of <rex> star on a <brick> background"] * 4,
                          num_inference_steps=20, output_type="np",
                          generator=torch.Generator("cuda").manual_seed(0)).images  # fmt: skip
            result["generate_seconds"] = round(time.perf_counter() - t0, 2)
            result["images_finite"] = bool(torch.isfinite(torch.from_numpy(images)).all())
    result["run"] = run_meta()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
