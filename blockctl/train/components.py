"""Loading a base's pipeline parts for training, and the one module that computes a step's
predictions (so ``accelerate`` wraps a single forward for DDP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from blockctl.blocks import foreign_share
from blockctl.errors import InvalidInput
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
    resolution: int
    scaling_factor: float

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}


def load_components(base_dir: Path) -> Components:
    """The base's parts in float32 (trainable blocks need full precision on CPU anyway)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from blockctl.quiet import quiet_libraries

    quiet_libraries()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(base_dir / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(
            str(base_dir / "text_encoder"), dtype=torch.float32, use_safetensors=True
        )
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
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        sample_scheduler_config=scheduler_config,
        resolution=resolution,
        scaling_factor=float(vae.config.scaling_factor),
    )


class StepModel(nn.Module):
    """Concept predictions and, when asked, the erasure batch's student and target.

    The concept batch and the erasure student share one UNet call (batch concatenated): on
    small batches that is markedly cheaper than two calls. The target runs with the slot
    adapter off and without grad.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        adapter: ConceptAdapter,
        foreign: torch.Tensor | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.adapter = adapter
        self.text_slots = any(n.startswith("text_encoder.") for n in adapter.slots)
        # Other slots' down-projections at the text encoder's width, when token isolation is on.
        self.foreign: torch.Tensor | None
        self.register_buffer("foreign", foreign)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids)[0]

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        ids: torch.Tensor,
        erasure: ErasureBatch | None = None,
    ) -> StepOutput:
        cond = self.encode(ids)
        isolation = None
        if self.foreign is not None:
            # What the learnt token changes in the prompt's encoding (the token and every
            # position that attends to it), compared with the untrained model.
            with torch.no_grad(), self.adapter.disabled():
                before = self.encode(ids)
            isolation = foreign_share(cond.float() - before.float(), self.foreign)
        if erasure is None:
            return StepOutput(self.unet(noisy, timesteps, cond).sample, None, None, isolation)
        embedding = self.adapter.embedding
        embedding.set_scratch(erasure.standins)  # the stand-in tokens' rows, if any
        try:
            with torch.no_grad(), self.adapter.slots_disabled():
                base_cond = self.encode(erasure.ids)
                target = self.unet(erasure.noisy, erasure.timesteps, base_cond).sample
            # Without text-encoder slots the erasure prompts encode the same with or without
            # the adapter (the learnt token is never among them): the no-grad encoding is reused.
            roe_cond = self.encode(erasure.ids) if self.text_slots else base_cond
        finally:
            embedding.set_scratch(None)
        both = self.unet(
            torch.cat([noisy, erasure.noisy.to(noisy.dtype)]),
            torch.cat([timesteps, erasure.timesteps]),
            torch.cat([cond, roe_cond.to(cond.dtype)]),
        ).sample
        n = noisy.shape[0]
        return StepOutput(both[:n], both[n:], target, isolation)


class StepOutput(NamedTuple):
    pred: torch.Tensor  # the concept batch's prediction
    student: torch.Tensor | None  # erasure batch, adapter on
    teacher: torch.Tensor | None  # erasure batch, adapter's slots off (no grad)
    isolation: torch.Tensor | None  # share of the token's change other slots can see
