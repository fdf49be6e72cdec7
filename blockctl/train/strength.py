"""How strongly the concept has been learnt so far: ‖δ‖² on a small fixed probe, tracked during
training (docs/design.md §5 and §10).

δ here is what the identity metrics call δ_s, on a smaller probe: the change of the UNet's
prediction on the concept's own prompts (the four phrasings eval uses) between the trained model
and the base reading the same prompts as a base does (the token in pieces, slots off), on fixed
seeded Gaussian noised latents at timesteps in [100, 900). So the curve tracks the ‖δ_s‖² that
``blockctl eval`` divides every ratio by (measured against the token at its starting embedding
instead, the two ranked six trained concepts differently). It needs no second model and costs
two forward passes of 16 items, so the loop samples it every few dozen steps (about 5 % of the
training time) and the adapter file keeps the curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from blockctl.conditioning import default_time_ids, denoise, encode
from blockctl.prompts import own_prompts
from blockctl.train.slot_adapter import ConceptAdapter

WINDOW = 3  # samples averaged before comparing with a target: the curve is noisy step to step
LATENTS_PER_PROMPT = 4
T_MIN, T_MAX = 100, 900  # as the identity metrics' probe: away from the extremes


@dataclass(frozen=True)
class StrengthProbe:
    ids: torch.Tensor  # (k, L) the concept's own prompts, each LATENTS_PER_PROMPT times
    base_ids: torch.Tensor  # (k, L) the same prompts as the base tokenizer reads them
    noisy: torch.Tensor  # (k, C, h, w)
    timesteps: torch.Tensor  # (k,)
    time_ids: torch.Tensor | None = None  # SDXL: add_time_ids of an uncropped image (k, 6)


def make_probe(
    tokenize: object, tokenize_base: object, token: str, class_word: str,
    latent_shape: tuple[int, ...], scheduler: object, seed: int, image_size: int | None = None,
) -> StrengthProbe:  # fmt: skip
    """Seeded Gaussian latents, noised at seeded timesteps, each paired with one own prompt;
    with ``image_size`` (SDXL), the add_time_ids of an uncropped image of that size."""
    prompts = [p for p in own_prompts(token, class_word) for _ in range(LATENTS_PER_PROMPT)]
    gen = torch.Generator().manual_seed(seed)
    shape = (len(prompts), *latent_shape)
    latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    timesteps = torch.randint(T_MIN, T_MAX, (len(prompts),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, timesteps)  # type: ignore[attr-defined]
    ids = tokenize(prompts)  # type: ignore[operator]
    time_ids = None if image_size is None else default_time_ids(image_size, len(prompts))
    return StrengthProbe(ids, tokenize_base(prompts), noisy, timesteps, time_ids)  # type: ignore[operator]


@torch.no_grad()
def delta_sq(
    probe: StrengthProbe,
    unet: nn.Module,
    text_encoders: nn.Module | Sequence[nn.Module],
    adapter: ConceptAdapter,
) -> float:
    """mean((ε_trained − ε_base)²) over the probe (one text encoder, or SDXL's two)."""
    encoders = [text_encoders] if isinstance(text_encoders, nn.Module) else list(text_encoders)
    device = next(unet.parameters()).device
    noisy, t = probe.noisy.to(device), probe.timesteps.to(device)
    time_ids = None if probe.time_ids is None else probe.time_ids.to(device)
    on = denoise(unet, noisy, t, encode(encoders, probe.ids.to(device)), time_ids)
    with adapter.disabled():
        off = denoise(unet, noisy, t, encode(encoders, probe.base_ids.to(device)), time_ids)
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
