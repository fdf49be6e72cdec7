"""The SDXL embedding layout (``clip_l`` + ``clip_g``) loaded by diffusers into a tiny SDXL
pipeline built here: each tensor into its own text encoder, as diffusers documents for SDXL
embeddings (a file of two tensors is not a one-key state dict, so it is loaded per encoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from blockctl.merge.embeddings import write_file
from tests.support.generation import generate

# Different widths for the two encoders, so a swapped key cannot load.
WIDTH_L, WIDTH_G, PROJECTION, TIME_DIM = 32, 48, 16, 8


def _text_config(tokenizer: CLIPTokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sdxl(tokenizer_dir: Path) -> StableDiffusionXLPipeline:
    """Two CLIP encoders (the second with a projection: SDXL's pooled prompt), a UNet whose
    added conditioning is SDXL's ``text_time`` (pooled prompt + 6 size/crop numbers)."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        attention_head_dim=(2,),
        cross_attention_dim=WIDTH_L + WIDTH_G,  # the two encodings side by side
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + PROJECTION,
    )
    vae = AutoencoderKL(
        block_out_channels=(16,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer, WIDTH_L)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, WIDTH_G)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


@pytest.fixture(scope="module")
def sdxl(tiny_base: Path) -> StableDiffusionXLPipeline:
    return tiny_sdxl(tiny_base / "tokenizer")


def test_sdxl_embedding_loads_into_both_encoders(
    sdxl: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(1)
    rows = {
        "text_encoder": torch.randn(1, WIDTH_L, generator=gen),
        "text_encoder_2": torch.randn(1, WIDTH_G, generator=gen),
    }
    file = tmp_path / "rex.safetensors"
    write_file(file, rows, {"format": "pt"})
    state = load_file(str(file))
    assert sorted(state) == ["clip_g", "clip_l"]
    pairs = [
        ("clip_l", sdxl.text_encoder, sdxl.tokenizer, "text_encoder"),
        ("clip_g", sdxl.text_encoder_2, sdxl.tokenizer_2, "text_encoder_2"),
    ]
    for key, encoder, tokenizer, component in pairs:
        sdxl.load_textual_inversion(
            state[key], token="<rex>", text_encoder=encoder, tokenizer=tokenizer
        )
        token_id = tokenizer.convert_tokens_to_ids("<rex>")
        assert tokenizer("a photo of <rex> thing").input_ids.count(token_id) == 1
        table = encoder.get_input_embeddings().weight
        assert torch.equal(table[token_id], rows[component][0])
    generate(sdxl, "a photo of <rex> thing", 16)
