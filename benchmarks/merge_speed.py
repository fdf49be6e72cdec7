"""Merge speed on an SD-1.5-shaped pipeline: blockctl merge vs copying the UNet file (the I/O
floor) vs diffusers' own path (load_lora_weights ×N + fuse_lora + save_pretrained). blockctl runs
twice: linking the files the merge leaves unchanged to the base's (the default) and with
``--copy`` (full copies), with the bytes each actually writes. And on an SDXL-shaped pipeline
(``sdxl`` in the results): blockctl merge into each format vs copying the UNet file, in the
same run.

The base is written here with random fp16 weights, no download: the published SD 1.5 UNet and
VAE configs, and a CLIP text encoder of SD 1.5's width and depth (768 wide, 12 layers) whose
vocabulary is the toy tokenizer's (~500 tokens instead of 49408: we have no SD vocabulary
offline, and merge needs tokenizer and embedding to agree). The UNet file is SD 1.5's 1.7 GB.

The SDXL-shaped base has the published SDXL 1.0 UNet and VAE configs and the two text encoders'
widths and depths (CLIP ViT-L 768 × 12, OpenCLIP bigG 1280 × 32), again with the toy
vocabulary: random fp16 weights written tensor by tensor, never a model in memory; the UNet file
is SDXL's 5.1 GB. diffusers' fuse path is not run on it: loading and fusing 15 LoRAs into a 2.6B
parameter UNet on two CPU cores takes minutes and tells nothing new.

Each contender runs in its own subprocess, timed from after its imports to the end of the
write, its peak RSS read from its own /proc/self/status (VmHWM). Usage::

    python benchmarks/merge_speed.py [--work /tmp/merge-bench] [--repeats 2] [--cases sdxl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_meta import RESULTS, git_commit  # noqa: E402 - a sibling, importable by the path above

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "center_input_sample": False,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
}
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, text_encoder_2
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE: dict[str, Any] = {
    **SD15_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
CLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


def _write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    from blockctl.safetensors_io import Entry, StreamWriter

    gen = torch.Generator().manual_seed(seed)
    entries = [Entry(k, torch.float16, s) for k, s in sorted(shapes.items())]
    with StreamWriter(path, entries, {"format": "pt"}) as writer:
        for e in entries:
            writer.write(e.key, (0.02 * torch.randn(e.shape, generator=gen)).to(torch.float16))


def _toy_tokenizer() -> Any:
    """A CLIP tokenizer of the toy vocabulary (~500 tokens; no CLIP vocabulary offline)."""
    from transformers import CLIPTokenizer

    from blockctl.toy.model import write_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, ())
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _write_parts(base: Path, parts: tuple[tuple[str, Any, str], ...]) -> None:
    """Each (component, model built on the meta device, weight file stem): its config, and
    random fp16 weights of its shapes."""
    for i, (name, model, stem) in enumerate(parts):
        (base / name).mkdir(parents=True)
        if name.startswith("text_encoder"):
            model.config.save_pretrained(str(base / name))
        else:
            model.save_config(str(base / name))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _write_random(base / name / f"{stem}.safetensors", shapes, seed=i)


def build_base(root: Path) -> Path:
    """An SD-1.5-shaped pipeline folder with random fp16 weights, written tensor by tensor."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    base = root / "base"
    if (base / "model_index.json").is_file():
        return base
    shutil.rmtree(base, ignore_errors=True)
    tokenizer = _toy_tokenizer()
    tokenizer.save_pretrained(str(base / "tokenizer"))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **CLIP_L,
        )
        text = CLIPTextModel(config)
    parts = (
        ("unet", unet, "diffusion_pytorch_model"),
        ("vae", vae, "diffusion_pytorch_model"),
        ("text_encoder", text, "model"),
    )
    _write_parts(base, parts)
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True
    ).save_config(str(base / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (base / "model_index.json").write_text(json.dumps(index, indent=2))
    return base


def build_sdxl_base(root: Path) -> Path:
    """An SDXL-shaped pipeline folder with random fp16 weights, written tensor by tensor."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = root / "sdxl-base"
    if (base / "model_index.json").is_file():
        return base
    shutil.rmtree(base, ignore_errors=True)
    tokenizer = _toy_tokenizer()
    tokenizer.save_pretrained(str(base / "tokenizer"))
    tokenizer.pad_token = "!"  # as SDXL's second tokenizer pads
    tokenizer.save_pretrained(str(base / "tokenizer_2"))
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 1}  # fmt: skip
    with torch.device("meta"):
        parts = (
            ("unet", UNet2DConditionModel(**SDXL_UNET), "diffusion_pytorch_model"),
            ("vae", AutoencoderKL(**SDXL_VAE), "diffusion_pytorch_model"),
            ("text_encoder", CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L)), "model"),
            (
                "text_encoder_2",
                CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_BIGG)),
                "model",
            ),
        )
    _write_parts(base, parts)
    EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading",
    ).save_config(str(base / "scheduler"))  # fmt: skip
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (base / "model_index.json").write_text(json.dumps(index, indent=2))
    return base


def build_registry(root: Path, base: Path, n: int) -> Path:
    """A registry of 80 rank-4 slots (80·4 = 320 ≤ 768) with ``n`` random adapters published."""
    from blockctl.adapter import AdapterMeta, token_key, up_key, write_adapter
    from blockctl.layout import build_layout, sha256_file
    from registry import open_registry

    where = root / f"reg-{base.name}"
    shutil.rmtree(where, ignore_errors=True)
    basis = root / f"basis-{base.name}.safetensors"
    layout = build_layout(str(base), base, slots=80, rank=4, basis_path=basis)
    reg = open_registry(str(where))
    reg.create(layout.to_dict(), basis)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        concept = f"c{i:02d}"
        rec = reg.reserve(concept, f"<{concept}>", "thing", "bench")
        tensors = {
            up_key(t.name): 0.01 * torch.randn(t.out_features, 4, generator=gen)
            for t in layout.targets
        }
        for encoder, width in layout.token_dims.items():  # SDXL: a row in each encoder
            tensors[token_key(rec.token, encoder)] = 0.02 * torch.randn(1, width, generator=gen)
        meta = AdapterMeta(
            concept,
            rec.slot,
            (rec.token,),
            "thing",
            4,
            layout.scale,
            layout.layout_hash,
            layout.base_fingerprint,
            text_encoders=tuple(layout.token_dims),
        )
        path = root / f"{concept}.safetensors"
        write_adapter(path, tensors, meta)
        reg.publish(concept, path, sha256_file(path))
        path.unlink()
    return where


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM); ru_maxrss of a child would include the forking
    parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


_HWM = """
import sys
sys.path.insert(0, "benchmarks")
from merge_speed import peak_rss_bytes as hwm
"""

_BLOCKCTL = (
    _HWM
    + """
import json, sys, time
from pathlib import Path
from blockctl.merge import MergeOptions, merge
from registry import open_registry
reg, out, n, copy = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "copy"
fmt = sys.argv[5] if len(sys.argv) > 5 else "diffusers"
t = time.perf_counter()
merge(open_registry(reg), [f"c{i:02d}" for i in range(n)],
      MergeOptions(out=out, copy=copy, format=fmt))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_bytes": hwm()}))
"""
)

_DIFFUSERS = (
    _HWM
    + """
import json, sys, time
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
base, loras, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
t = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float16,
    local_files_only=True, safety_checker=None, requires_safety_checker=False)
names = []
for i, path in enumerate(loras):
    pipe.load_lora_weights(path, adapter_name=f"c{i}")
    names.append(f"c{i}")
pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
pipe.unload_lora_weights()
pipe.save_pretrained(out, safe_serialization=True)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_bytes": hwm()}))
"""
)


def run_child(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter: the seconds and peak RSS it reports, and wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = (b.decode() for b in proc.communicate())
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["wall_with_imports"] = time.perf_counter() - start
    return report


def warm(path: Path) -> None:
    """Read a file or folder once so every contender starts from a warm page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass


def written_bytes(folder: Path) -> int:
    """Bytes of the files that are not links to (or clones of) another file."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files if p.stat().st_nlink == 1)


def timed_copy(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    return seconds


def sd15_case(args: argparse.Namespace) -> dict[str, Any]:
    """The SD-1.5-shaped pipeline against the UNet-file copy and diffusers' fuse path."""
    work: Path = args.work
    from blockctl.merge import MergeOptions, merge
    from registry import open_registry

    t = time.perf_counter()
    base = build_base(work)
    counts = [int(c) for c in args.scaling.split(",")]
    reg_path = build_registry(work, base, max([args.concepts, *counts]))
    setup = time.perf_counter() - t
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    unet_bytes = unet_file.stat().st_size
    warm(base)

    # Interleaved, best of each: the disk is shared, so conditions drift between runs.
    copies: list[float] = []
    folder_copies: list[float] = []
    ours: list[dict[str, Any]] = []
    ours_copy: list[dict[str, Any]] = []
    written: dict[str, int] = {}
    for _ in range(args.repeats):
        copies.append(timed_copy(unet_file, work / "copy.safetensors"))
        folder_copies.append(timed_copy(base, work / "copy-folder"))
        for mode, runs in (("link", ours), ("copy", ours_copy)):
            out = work / "blockctl-out"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_child(_BLOCKCTL, str(reg_path), str(out), str(args.concepts), mode))
            written[mode] = written_bytes(out)
            shutil.rmtree(out)

    # diffusers' path gets each concept as an ordinary rank-4 LoRA (exported by blockctl).
    reg = open_registry(str(reg_path))
    loras = []
    for i in range(args.concepts):
        path = work / f"lora-{i:02d}.safetensors"
        if not path.exists():
            merge(reg, [f"c{i:02d}"], MergeOptions(out=path, format="lora"))
        loras.append(str(path))
    theirs_out = work / "diffusers-out"
    shutil.rmtree(theirs_out, ignore_errors=True)
    warm(base)
    theirs = run_child(_DIFFUSERS, str(base), *loras, str(theirs_out))
    shutil.rmtree(theirs_out)

    scaling = {}
    for n in counts:
        out = work / f"scale-{n}"
        shutil.rmtree(out, ignore_errors=True)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            merge(reg, [f"c{i:02d}" for i in range(n)], MergeOptions(out=out))
            times.append(time.perf_counter() - t)
            shutil.rmtree(out)
        scaling[str(n)] = round(min(times), 3)

    best_ours = min(r["seconds"] for r in ours)
    best_copy = min(r["seconds"] for r in ours_copy)
    peak = max(r["peak_rss_bytes"] for r in ours + ours_copy)
    result = {
        "what": "blockctl merge of N rank-4 concepts into an SD-1.5-shaped fp16 diffusers "
        "pipeline (cross-kv preset), unchanged files linked to the base (default) or copied "
        "(--copy), vs copying the UNet file and diffusers' load_lora_weights xN + fuse_lora + "
        "save_pretrained",
        "git_commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "base": {
            "unet_bytes": unet_bytes,
            "pipeline_bytes": sum(p.stat().st_size for p in base.rglob("*") if p.is_file()),
            "note": "random fp16 weights; SD 1.5 UNet/VAE configs; CLIP-L-sized text "
            "encoder with the toy tokenizer's vocabulary",
        },
        "concepts": args.concepts,
        "seconds": {
            "copy_unet_file": round(min(copies), 3),
            "copy_pipeline_folder": round(min(folder_copies), 3),
            "blockctl_merge": round(best_ours, 3),
            "blockctl_merge_copy": round(best_copy, 3),
            "diffusers_fuse_save": round(theirs["seconds"], 3),
        },
        "all_seconds": {
            "copy_unet_file": [round(x, 3) for x in copies],
            "blockctl_merge": [round(r["seconds"], 3) for r in ours],
            "blockctl_merge_copy": [round(r["seconds"], 3) for r in ours_copy],
        },
        "bytes_written": {
            "blockctl_merge": written["link"],
            "blockctl_merge_copy": written["copy"],
            "note": "files of the output that are not hard links to the base's (nlink == 1)",
        },
        "ratios": {
            "blockctl_vs_copy_unet_file": round(best_ours / min(copies), 2),
            "blockctl_copy_vs_copy_unet_file": round(best_copy / min(copies), 2),
            "blockctl_copy_vs_blockctl": round(best_copy / best_ours, 2),
            "blockctl_vs_copy_pipeline_folder": round(best_ours / min(folder_copies), 2),
            "diffusers_vs_blockctl": round(theirs["seconds"] / best_ours, 2),
        },
        "peak_rss": {
            "blockctl_bytes": peak,
            "blockctl_vs_unet_file": round(peak / unet_bytes, 3),
            "diffusers_bytes": theirs["peak_rss_bytes"],
            "note": "whole-process peak (VmHWM of the child), Python + torch imports included",
        },
        "scaling_seconds_by_concepts": scaling,
        "targets": {"vs_copy_max": 1.5, "vs_diffusers_min": 3.0, "rss_vs_unet_max": 0.5},
        "setup_seconds": round(setup, 1),
    }
    return result


def sdxl_case(args: argparse.Namespace) -> dict[str, Any]:
    """The SDXL-shaped pipeline: blockctl merge into each format against copying the UNet file
    (interleaved, best of ``repeats``), each merge in its own process."""
    from bench_meta import run_meta

    from blockctl.merge.embeddings import embeddings_dir

    work: Path = args.work
    t = time.perf_counter()
    base = build_sdxl_base(work)
    reg_path = build_registry(work, base, args.concepts)
    setup = time.perf_counter() - t
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    unet_bytes = unet_file.stat().st_size
    warm(base)
    # name: (format, link|copy, output)
    contenders = {
        "diffusers": ("diffusers", "link", work / "sdxl-out"),
        "diffusers_copy": ("diffusers", "copy", work / "sdxl-out"),
        "single-file": ("single-file", "link", work / "sdxl-out.safetensors"),
        "lora": ("lora", "link", work / "sdxl-lora.safetensors"),
    }
    copies: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    written: dict[str, int] = {}
    for _ in range(args.repeats):
        copies.append(timed_copy(unet_file, work / "sdxl-copy.safetensors"))
        for name, (fmt, mode, out) in contenders.items():
            args_ = (str(reg_path), str(out), str(args.concepts), mode, fmt)
            runs[name].append(run_child(_BLOCKCTL, *args_))
            if out.is_dir():
                written[name] = written_bytes(out)
            for path in (out, embeddings_dir(out)):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    best = {fmt: min(r["seconds"] for r in rs) for fmt, rs in runs.items()}
    peak = {fmt: max(r["peak_rss_bytes"] for r in rs) for fmt, rs in runs.items()}
    return {
        "what": "blockctl merge of N rank-4 concepts into an SDXL-shaped fp16 pipeline "
        "(cross-kv preset: the 140 cross-attention to_k/to_v of SDXL's UNet), as a diffusers "
        "folder (unchanged files linked to the base's, the default, or copied with --copy), an "
        "sgm single file and a kohya LoRA, vs copying the UNet file",
        **run_meta(),
        "base": {
            "unet_bytes": unet_bytes,
            "pipeline_bytes": sum(p.stat().st_size for p in base.rglob("*") if p.is_file()),
            "note": "random fp16 weights written tensor by tensor; SDXL 1.0 UNet/VAE configs; "
            "CLIP ViT-L and OpenCLIP bigG text encoders of SDXL's widths and depths with the "
            "toy tokenizer's vocabulary",
        },
        "concepts": args.concepts,
        "seconds": {
            "copy_unet_file": round(min(copies), 3),
            **{f"blockctl_merge_{fmt}": round(v, 3) for fmt, v in best.items()},
        },
        "bytes_written": {
            **{f"blockctl_merge_{name}": n for name, n in written.items()},
            "note": "files of the output that are not hard links to the base's (nlink == 1)",
        },
        "ratios": {
            f"blockctl_{fmt}_vs_copy_unet_file": round(v / min(copies), 2)
            for fmt, v in best.items()
        },
        "peak_rss": {
            **{f"blockctl_{fmt}_bytes": v for fmt, v in peak.items()},
            "blockctl_diffusers_vs_unet_file": round(peak["diffusers"] / unet_bytes, 3),
            "note": "whole-process peak (VmHWM of the child), Python + torch imports included",
        },
        "setup_seconds": round(setup, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "merge-bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_speed.json")
    parser.add_argument("--concepts", type=int, default=15)
    parser.add_argument("--scaling", default="1,5,15,40,80")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases",
        default="sd15,sdxl",
        help="sd15, sdxl or both; a case not run keeps its earlier results in --out",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cases = set(args.cases.split(","))
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "sd15" in cases:
        result = {**sd15_case(args), "sdxl": result.get("sdxl")}
    if "sdxl" in cases:
        result["sdxl"] = sdxl_case(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
