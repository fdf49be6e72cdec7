"""How strongly the concept has been learnt so far: ‖δ‖² on a small fixed probe, tracked during
training (DESIGN section 10 defines δ; this is its cheap in-training cousin).

δ here is the change of the UNet's prediction on the concept's own prompt between the adapter
on and the adapter off (token back at its starting embedding, slots off), on a few fixed noised
latents of the concept's own photos at fixed timesteps. It needs no second model and costs two
small forward passes, so the loop can sample it every few dozen steps and the adapter file can
report the curve. Every concept's ratio metrics are divided by its own ‖δ‖²: a concept that
learnt little looks bad on all of them, which is why the curve is worth keeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blockctl.train.data import LatentBank
from blockctl.train.slot_adapter import ConceptAdapter

WINDOW = 3  # samples averaged before comparing with a target: the curve is noisy step to step
PROBE_ITEMS = 4
PROBE_TIMES = (0.2, 0.4, 0.6, 0.8)  # of the schedule: away from the extremes, as eval's probe


@dataclass(frozen=True)
class StrengthProbe:
    ids: torch.Tensor  # (k, L) the concept's own caption, repeated
    noisy: torch.Tensor  # (k, C, h, w)
    timesteps: torch.Tensor  # (k,)


def make_probe(
    bank: LatentBank, caption_ids: torch.Tensor, scheduler: object, seed: int
) -> StrengthProbe:
    """Fixed noised latents of the first photos (seeded), each with its own caption."""
    gen = torch.Generator().manual_seed(seed)
    n = bank.mean.shape[1]
    index = torch.arange(PROBE_ITEMS) % n
    flip = torch.zeros(PROBE_ITEMS, dtype=torch.bool)
    shape = (PROBE_ITEMS, *bank.mean.shape[2:])
    latents = bank.sample(index, flip, torch.randn(shape, generator=gen))
    noise = torch.randn(latents.shape, generator=gen)
    steps = int(scheduler.config.num_train_timesteps)  # type: ignore[attr-defined]
    timesteps = (torch.tensor(PROBE_TIMES) * steps).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)  # type: ignore[attr-defined]
    return StrengthProbe(caption_ids[index], noisy, timesteps)


@torch.no_grad()
def delta_sq(
    probe: StrengthProbe, unet: nn.Module, text_encoder: nn.Module, adapter: ConceptAdapter
) -> float:
    """mean((ε_on − ε_off)²) over the probe."""
    device = next(unet.parameters()).device
    ids, noisy, t = probe.ids.to(device), probe.noisy.to(device), probe.timesteps.to(device)
    on = unet(noisy, t, text_encoder(ids)[0]).sample
    with adapter.disabled():
        off = unet(noisy, t, text_encoder(ids)[0]).sample
    return float(((on.float() - off.float()) ** 2).mean())


def smoothed(curve: list[tuple[int, float]], window: int = WINDOW) -> float | None:
    """Mean of the last ``window`` samples, or None before there are that many."""
    if len(curve) < window:
        return None
    return sum(v for _, v in curve[-window:]) / window


def reached(curve: list[tuple[int, float]], target: float, window: int = WINDOW) -> bool:
    """Whether the smoothed strength has reached ``target`` (> 0)."""
    value = smoothed(curve, window)
    return value is not None and value >= target
