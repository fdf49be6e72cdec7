"""Pretrain the toy base on the procedural world: VAE first, then UNet + text encoder.

    python -m blockctl.toy.pretrain --out DIR [--device cpu|cuda] [--vae-steps N]
        [--unet-steps N] [--batch N] [--max-minutes M] [--seed 0]

The text encoder is trained jointly with the UNet: a randomly initialised, frozen CLIP encoder
gives near-identical embeddings for different captions, and the UNet then ignores its prompt.
Latents are scaled to unit std (measured, stored as ``vae.config.scaling_factor``) or the
diffusion loss is trivially small and nothing about the prompt is learnt (docs/design.md §11).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from rich.console import Console

from blockctl.toy.model import TOY, ToySpec, build_pipeline, save_pipeline
from blockctl.toy.world import sample_batch

console = Console()


@dataclass(frozen=True)
class PretrainConfig:
    out: Path
    device: str = "cpu"
    # CPU defaults: the time cap, not the step counts, bounds a 2-core run under an hour.
    # The shipped weights came from a GPU run (see blockctl/toy/weights/README.md).
    vae_steps: int = 500
    unet_steps: int = 1500
    batch: int = 32
    max_minutes: float = 55.0  # the whole run; each phase gets a share
    vae_share: float = 0.25
    lr: float = 4e-4
    cfg_drop: float = 0.1  # empty captions, so classifier-free guidance has an unconditional
    ema: float = 0.999
    workers: int = 0
    measure_n: int = 512  # images used to measure the latent std
    seed: int = 0


class _WorldStream(torch.utils.data.IterableDataset):
    """Endless world batches; each worker draws from its own seed range."""

    def __init__(self, batch: int, seed: int) -> None:
        self.batch, self.seed = batch, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        k = wid
        while True:
            images, scenes = sample_batch(self.batch, seed=self.seed * 1_000_003 + k)
            k += nw
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            yield x, [s.caption for s in scenes]


def _batches(cfg: PretrainConfig, seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    loader = torch.utils.data.DataLoader(
        _WorldStream(cfg.batch, seed),
        batch_size=None,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None,
    )
    for x, caps in loader:
        yield x.to(cfg.device, non_blocking=True), list(caps)


class _Progress:
    """One line every few seconds: step, loss, steps/s and the ETA of the phase."""

    def __init__(self, name: str, total: int, budget_s: float) -> None:
        self.name, self.total, self.budget = name, total, budget_s
        self.t0 = self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def done(self, step: int) -> bool:
        return step >= self.total or self.elapsed() > self.budget

    def tick(self, step: int, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.last < 5 and step not in (1, self.total):
            return  # reading the loss syncs the GPU, so only when printing
        self.last = now
        rate = step / max(self.elapsed(), 1e-9)
        eta = min((self.total - step) / max(rate, 1e-9), self.budget - self.elapsed())
        console.print(
            f"[{self.name}] step {step}/{self.total} loss {loss.item():.4f} "
            f"{rate:.2f} steps/s ETA {max(eta, 0) / 60:.1f} min",
            highlight=False,
            markup=False,
        )


def _autocast(device: str) -> torch.autocast:
    # bf16 on GPU for speed; fp32 on CPU, where bf16 autocast is slower for these small convs.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def train_vae(pipe: Any, cfg: PretrainConfig, budget_s: float) -> float:
    """Reconstruction (L1 + MSE) with a tiny KL; returns the measured latent scaling factor."""
    vae = pipe.vae.to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    prog = _Progress("vae", cfg.vae_steps, budget_s)
    step = 0
    for x, _ in _batches(cfg, cfg.seed * 7 + 1):
        if prog.done(step):
            break
        with _autocast(cfg.device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        prog.tick(step, loss.detach())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _ = sample_batch(cfg.measure_n, seed=cfg.seed + 99)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(cfg.device) / 127.5 - 1
        z = vae.encode(x).latent_dist.sample()
        err = float((vae.decode(z).sample - x).abs().mean())
    std = float(z.std())
    console.print(f"[vae] {step} steps, recon L1 {err:.4f}, latent std {std:.4f}", markup=False)
    return 1.0 / std


class _Ema:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm up: early EMA would lag badly
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


def train_unet(pipe: Any, cfg: PretrainConfig, scale: float, budget_s: float) -> None:
    """Epsilon prediction on scaled latents, UNet and text encoder together."""
    dev = cfg.device
    vae, unet, te, tok = pipe.vae, pipe.unet.to(dev).train(), pipe.text_encoder, pipe.tokenizer
    te.to(dev).train()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = sched.alphas_cumprod.to(dev)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    warm = 200
    ema = _Ema(params, cfg.ema)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    prog = _Progress("unet", cfg.unet_steps, budget_s)
    for step, (x, caps) in enumerate(_batches(cfg, cfg.seed * 7 + 2)):
        if prog.done(step):
            break
        n = x.shape[0]
        drop = torch.rand(n, generator=gen) < cfg.cfg_drop
        caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)]
        ids = tok(
            caps,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(dev)
        with torch.no_grad(), _autocast(dev):
            z0 = vae.encode(x).latent_dist.sample().float() * scale
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast(dev):
            ctx = te(ids)[0]
            eps = unet(zt, t, ctx).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        # Cosine decay over whichever runs out first, steps or time, then warm-up on top.
        frac = min(1.0, max(step / cfg.unet_steps, prog.elapsed() / budget_s))
        for g in opt.param_groups:
            g["lr"] = (
                cfg.lr * min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * frac))
            )
        opt.step()
        ema.update(step + 1)
        prog.tick(step + 1, loss.detach())
    ema.copy_to_params()
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)


def pretrain(cfg: PretrainConfig, spec: ToySpec = TOY) -> Path:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.perf_counter()
    pipe = build_pipeline(spec, seed=cfg.seed)
    budget = cfg.max_minutes * 60
    scale = train_vae(pipe, cfg, budget * cfg.vae_share)
    pipe.vae.register_to_config(scaling_factor=scale)
    train_unet(pipe, cfg, scale, budget - (time.perf_counter() - t0))
    pipe.to("cpu")
    out = save_pipeline(pipe, cfg.out, dtype=torch.float16)
    console.print(
        f"saved {out} (scaling_factor {scale:.4f}) in {(time.perf_counter() - t0) / 60:.1f} min",
        highlight=False,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blockctl.toy.pretrain", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vae-steps", type=int, default=PretrainConfig.vae_steps)
    p.add_argument("--unet-steps", type=int, default=PretrainConfig.unet_steps)
    p.add_argument("--batch", type=int, default=PretrainConfig.batch)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--max-minutes", type=float, default=PretrainConfig.max_minutes)
    p.add_argument("--vae-share", type=float, default=PretrainConfig.vae_share)
    p.add_argument("--workers", type=int, default=PretrainConfig.workers)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = PretrainConfig(
        out=a.out,
        device=a.device,
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        batch=a.batch,
        lr=a.lr,
        max_minutes=a.max_minutes,
        vae_share=a.vae_share,
        workers=a.workers,
        seed=a.seed,
    )
    pretrain(cfg)


if __name__ == "__main__":
    main()
