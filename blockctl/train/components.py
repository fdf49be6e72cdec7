"""Loading a base's pipeline parts for training, and the one module that computes a step's
predictions (so ``accelerate`` wraps a single forward for DDP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from blockctl.blocks import foreign_share
from blockctl.conditioning import Conditioning, denoise, encode, load_text_part
from blockctl.errors import InvalidInput
from blockctl.family import SD, Family
from blockctl.train.roe import ErasureBatch
from blockctl.train.slot_adapter import ConceptAdapter


@dataclass
class Components:
    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any  # DDPMScheduler on the base's training noise schedule
    sample_scheduler_config: dict[str, Any]
    resolution: int  # the base's own: the UNet's sample size × the VAE's downsampling
    scaling_factor: float
    family: Family = SD
    tokenizer_2: Any = None  # SDXL's second tokenizer and text encoder
    text_encoder_2: nn.Module | None = None
    vae_factor: int = 8  # pixels per latent cell

    def modules(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return parts

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 else [])

    def tokenizers(self) -> dict[str, Any]:
        """By component name: what ``slot_adapter.attach`` takes."""
        out = {"text_encoder": self.tokenizer}
        if self.tokenizer_2 is not None:
            out["text_encoder_2"] = self.tokenizer_2
        return out

    @property
    def vae_upcast(self) -> bool:
        """Whether the VAE must encode in float32 (SDXL's overflows in float16)."""
        return bool(getattr(self.vae.config, "force_upcast", False))


def load_components(base_dir: Path, family: Family = SD) -> Components:
    """The base's parts in float32 (trainable blocks need full precision on CPU anyway)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from blockctl.quiet import quiet_libraries

    quiet_libraries()
    try:
        tokenizers, encoders = [], []
        for part in family.text:
            encoder, tokenizer = load_text_part(base_dir, part, torch.float32)
            tokenizers.append(tokenizer)
            encoders.append(encoder)
        vae = AutoencoderKL.from_pretrained(
            str(base_dir / "vae"), torch_dtype=torch.float32, use_safetensors=True
        )
        unet = UNet2DConditionModel.from_pretrained(
            str(base_dir / "unet"), torch_dtype=torch.float32, use_safetensors=True
        )
        scheduler_config = dict(DDPMScheduler.load_config(str(base_dir / "scheduler")))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot load the base model from {base_dir}: {exc}") from exc
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = int(unet.config.sample_size) * vae_factor
    second = family.dual_text
    return Components(
        tokenizer=tokenizers[0],
        text_encoder=encoders[0],
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        sample_scheduler_config=scheduler_config,
        resolution=resolution,
        scaling_factor=float(vae.config.scaling_factor),
        family=family,
        tokenizer_2=tokenizers[1] if second else None,
        text_encoder_2=encoders[1] if second else None,
        vae_factor=vae_factor,
    )


class StepModel(nn.Module):
    """Concept predictions and, when asked, the erasure batch's student and target.

    The concept batch and the erasure student share one UNet call (batch concatenated): on
    small batches that is markedly cheaper than two calls. The target runs with the slot
    adapter off and without grad. Conditioning (conditioning.py) is the family's: on SDXL both
    text encoders, the pooled embedding and ``time_ids``, the add_time_ids of each image.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        adapter: ConceptAdapter,
        foreign: torch.Tensor | None = None,
        text_encoder_2: nn.Module | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.adapter = adapter
        self.text_slots = any(n.startswith("text_encoder") for n in adapter.slots)
        # Other slots' down-projections at the conditioning's width, when token isolation is on.
        self.foreign: torch.Tensor | None
        self.register_buffer("foreign", foreign)

    def encode(self, ids: torch.Tensor) -> Conditioning:
        encoders = [self.text_encoder]
        if self.text_encoder_2 is not None:
            encoders.append(self.text_encoder_2)
        return encode(encoders, ids)

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        ids: torch.Tensor,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction for prompts ``ids`` (one forward, no erasure)."""
        return denoise(self.unet, noisy, timesteps, self.encode(ids), time_ids)

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        ids: torch.Tensor,
        erasure: ErasureBatch | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> StepOutput:
        cond = self.encode(ids)
        isolation = None
        if self.foreign is not None:
            # What the learnt token changes in the prompt's encoding (the token and every
            # position that attends to it), compared with the untrained model.
            with torch.no_grad(), self.adapter.disabled():
                before = self.encode(ids)
            isolation = foreign_share(cond.hidden.float() - before.hidden.float(), self.foreign)
        if erasure is None:
            pred = denoise(self.unet, noisy, timesteps, cond, time_ids)
            return StepOutput(pred, None, None, isolation)
        # the stand-in tokens' rows, if any, in each encoder
        self.adapter.set_scratch(erasure.standin_rows())
        try:
            with torch.no_grad(), self.adapter.slots_disabled():
                base_cond = self.encode(erasure.ids)
                target = denoise(
                    self.unet, erasure.noisy, erasure.timesteps, base_cond, erasure.time_ids
                )
            # Without text-encoder slots the erasure prompts encode the same with or without
            # the adapter (the learnt token is never among them): the no-grad encoding is reused.
            roe_cond = self.encode(erasure.ids) if self.text_slots else base_cond
        finally:
            self.adapter.set_scratch({})
        both = denoise(
            self.unet,
            torch.cat([noisy, erasure.noisy.to(noisy.dtype)]),
            torch.cat([timesteps, erasure.timesteps]),
            cond.cat(roe_cond),
            _cat_or_none(time_ids, erasure.time_ids),
        )
        n = noisy.shape[0]
        return StepOutput(both[:n], both[n:], target, isolation)


class StepOutput(NamedTuple):
    pred: torch.Tensor  # the concept batch's prediction
    student: torch.Tensor | None  # erasure batch, adapter on
    teacher: torch.Tensor | None  # erasure batch, adapter's slots off (no grad)
    isolation: torch.Tensor | None  # share of the token's change other slots can see


def _cat_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])
