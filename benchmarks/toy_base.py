"""Quality benchmark of the shipped toy base: does it draw what the prompt asks?

For 48 held-out captions (color/shape/background triples never seen in pretraining) it samples
one image each with a fixed seed and classifies it: the shape's color by exact palette
statistics (backgrounds are neutral mid-tones, so any saturated or extreme pixels are the
shape), the shape by nearest neighbours over a bank of world masks. It also measures prompt
sensitivity: mean ||eps(x_t, c1) - eps(x_t, c2)|| / ||eps(x_t, c1)|| over random caption pairs.

    python benchmarks/toy_base.py [--model DIR] [--steps 20] [--guidance 4] [--seed 0]

Targets: color >= 90%, shape >= 70%. Writes benchmarks/results/toy_base.json and _grid.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_meta import RESULTS, run_meta
from PIL import Image, ImageDraw

from blockctl.sample import generate, load_pipeline
from blockctl.toy.vocab import SHAPES
from blockctl.toy.world import (
    COLOR_NAMES,
    COLOR_RGB,
    SIZE,
    held_out_captions,
    parse_caption,
    sample_batch,
    shape_mask,
)

PALETTE = np.array([COLOR_RGB[c] for c in COLOR_NAMES], np.float32)
COLOR_TOL = 75.0  # RGB distance; neutral backgrounds stay > 130 from every palette color
CROP = 20


def classify_color(img: np.ndarray) -> tuple[str | None, np.ndarray]:
    """The palette color with the most pixels near it, and the mask of those pixels."""
    d = np.linalg.norm(img[..., None, :].astype(np.float32) - PALETTE, axis=-1)  # H W C
    near = d < COLOR_TOL
    counts = near.sum(axis=(0, 1))
    if counts.max() < 8:
        return None, np.zeros(img.shape[:2], bool)
    k = int(counts.argmax())
    return COLOR_NAMES[k], near[..., k]


def normalise_mask(mask: np.ndarray) -> np.ndarray | None:
    """Crop to the mask's bounding box, pad to a square, resize: position/size invariant."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 8:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    sq = np.zeros((side, side), np.float32)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    sq[oy : oy + y1 - y0, ox : ox + x1 - x0] = mask[y0:y1, x0:x1]
    im = Image.fromarray((sq * 255).astype(np.uint8)).resize(
        (CROP, CROP), Image.Resampling.BILINEAR
    )
    return np.asarray(im, np.float32).ravel() / 255


def shape_bank(per_shape: int = 60, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Normalised masks of every world shape at random positions/sizes (blurred a little,
    like the VAE does, so edges look alike)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for s in SHAPES:
        for _ in range(per_shape):
            cx, cy = rng.uniform(18, 46, size=2)
            m = shape_mask(s, cx, cy, rng.uniform(9, 17)).astype(np.float32)
            blurred = np.asarray(
                Image.fromarray((m * 255).astype(np.uint8)).resize((32, 32)).resize((SIZE, SIZE))
            )
            f = normalise_mask(blurred > 127)
            if f is not None:
                feats.append(f)
                labels.append(s)
    return np.stack(feats), labels


def classify_shape(mask: np.ndarray, bank: tuple[np.ndarray, list[str]], k: int = 5) -> str | None:
    f = normalise_mask(mask)
    if f is None:
        return None
    feats, labels = bank
    nearest = np.argsort(((feats - f) ** 2).sum(axis=1))[:k]
    votes: dict[str, int] = {}
    for i in nearest:
        votes[labels[i]] = votes.get(labels[i], 0) + 1
    return max(votes, key=lambda s: votes[s])


def classifier_sanity(bank: tuple[np.ndarray, list[str]], n: int = 300) -> dict[str, float]:
    """The classifiers on real world images: an upper bound for what the base can score."""
    images, scenes = sample_batch(n, seed=777, allow_held_out=True)
    ok_c = ok_s = total = 0
    for img, sc in zip(images, scenes, strict=True):
        if sc.shape is None:
            continue
        total += 1
        color, mask = classify_color(img)
        ok_c += color == sc.color
        ok_s += classify_shape(mask, bank) == sc.shape
    return {"color": ok_c / total, "shape": ok_s / total}


@torch.no_grad()
def prompt_sensitivity(pipe: Any, pairs: int = 32, seed: int = 0) -> float:
    """Mean relative change of the UNet's prediction when only the caption changes."""
    gen = torch.Generator().manual_seed(seed)
    images, scenes = sample_batch(pairs * 2, seed=seed + 1, allow_held_out=True)
    caps = [s.caption for s in scenes]
    x = torch.from_numpy(images[:pairs]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.randint(100, 900, (pairs,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    zt = pipe.scheduler.add_noise(z0, noise, t) if hasattr(pipe.scheduler, "add_noise") else z0
    tok = pipe.tokenizer

    def eps(c: list[str]) -> torch.Tensor:
        ids = tok(
            c,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.unet(zt, t, pipe.text_encoder(ids)[0]).sample

    e1, e2 = eps(caps[:pairs]), eps(caps[pairs:])
    rel = (e1 - e2).flatten(1).norm(dim=1) / e1.flatten(1).norm(dim=1)
    return float(rel.mean())


def _grid(images: list[Image.Image], rows: list[dict[str, object]], path: Path) -> None:
    tile, cols = 128, 8
    grid = Image.new("RGB", (cols * tile, (len(images) + cols - 1) // cols * (tile + 24)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, r) in enumerate(zip(images, rows, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + 24)
        grid.paste(im.resize((tile, tile), Image.Resampling.NEAREST), (x, y + 24))
        want = f"{r['color']} {r['shape']}"
        got = f"{r['pred_color']} {r['pred_shape']}"
        draw.text((x + 2, y), want, fill="black")
        mark = ("c" if r["color_ok"] else "-") + ("s" if r["shape_ok"] else "-")
        draw.text((x + 2, y + 11), f"{mark} {got}", fill="green" if mark == "cs" else "red")
    grid.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model)
    bank = shape_bank()
    sanity = classifier_sanity(bank)
    captions = held_out_captions()
    images = []
    for i in range(0, len(captions), 8):  # one seed per caption, small batches for memory
        batch = generate(
            pipe, captions[i : i + 8], seed=a.seed, steps=a.steps, guidance=a.guidance, n=1
        )
        images += [row[0] for row in batch]
    rows: list[dict[str, object]] = []
    for cap, im in zip(captions, images, strict=True):
        color, shape, bg = parse_caption(cap)
        pc, mask = classify_color(np.asarray(im))
        ps = classify_shape(mask, bank)
        rows.append(
            {
                "caption": cap,
                "color": color,
                "shape": shape,
                "background": bg,
                "pred_color": pc,
                "pred_shape": ps,
                "color_ok": pc == color,
                "shape_ok": ps == shape,
            }
        )
    sens = prompt_sensitivity(pipe, seed=a.seed)
    color_acc = sum(bool(r["color_ok"]) for r in rows) / len(rows)
    shape_acc = sum(bool(r["shape_ok"]) for r in rows) / len(rows)
    result = {
        "model": str(a.model or "shipped toy base"),
        "captions": len(rows),
        "seed": a.seed,
        "steps": a.steps,
        "guidance": a.guidance,
        "color_accuracy": color_acc,
        "shape_accuracy": shape_acc,
        "targets": {"color_accuracy": 0.9, "shape_accuracy": 0.7},
        "prompt_sensitivity": sens,
        "classifier_accuracy_on_world_images": sanity,
        "seconds": round(time.perf_counter() - t0, 1),
        "run": run_meta(),
        "per_caption": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "toy_base.json").write_text(json.dumps(result, indent=2) + "\n")
    _grid(images, rows, a.out / "toy_base_grid.png")
    print(
        f"color {color_acc:.1%}  shape {shape_acc:.1%}  prompt sensitivity {sens:.3f}  "
        f"(classifiers on world images: color {sanity['color']:.1%}, "
        f"shape {sanity['shape']:.1%})  {result['seconds']} s"
    )


if __name__ == "__main__":
    main()
