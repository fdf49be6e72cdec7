"""A tiny Stable Diffusion XL pipeline built in-process (random weights, no download).

It has what makes SDXL different from SD 1.x, at toy sizes: two CLIP text encoders of different
widths (a ``CLIPTextModel`` like ViT-L and a ``CLIPTextModelWithProjection`` like OpenCLIP bigG,
with a projection narrower than its hidden width so a missed transpose shows), a UNet whose
cross-attention reads both encoders' hidden states side by side and whose
``addition_embed_type="text_time"`` takes the pooled embedding and ``add_time_ids``, a first
UNet level without attention, two layers per block and two transformer layers in the second
level, a VAE with ``force_upcast``, SDXL's Euler scheduler, and the legacy ``eos_token_id = 2``
of SDXL's published text-encoder configs (the pooled-output trap for added tokens).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from blockctl.toy.model import _load_tokenizer_files, write_tokenizer_files

IMAGE_SIZE = 32  # pixels; latents are 16×16 (one VAE halving)
WIDTH_1 = 32  # "CLIP ViT-L"
WIDTH_2 = 48  # "OpenCLIP bigG"
PROJECTION = 40  # bigG's text_projection output (1280 on the real one)
TIME_DIM = 8  # addition_time_embed_dim (256 on the real one)
MAX_TOKENS = 32


def _tokenizer(pad: str | None = None) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, ())
        tokenizer = _load_tokenizer_files(Path(tmp), MAX_TOKENS)
    if pad is not None:  # SDXL's second tokenizer pads with "!" instead of the end token
        tokenizer.pad_token = pad
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, width: int, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        # What SDXL's published configs say (not the tokenizer's ids): transformers then pools
        # at the argmax of the ids, i.e. at any added token, unless blockctl corrects it.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **extra,
    )


def build_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline, deterministic in ``seed``."""
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer(pad="!")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=WIDTH_1 + WIDTH_2,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + PROJECTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(tokenizer, WIDTH_1))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, WIDTH_2, projection_dim=PROJECTION, hidden_act="gelu")
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_sdxl(path: Path, seed: int = 0) -> Path:
    """Build and save the tiny SDXL pipeline (safetensors only) at ``path``."""
    build_sdxl(seed).save_pretrained(str(path), safe_serialization=True)
    return path
