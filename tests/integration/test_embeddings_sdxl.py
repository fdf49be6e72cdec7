"""The SDXL embedding layout (``clip_l`` + ``clip_g``) loaded by diffusers into the tiny SDXL
pipeline of the tests (tests/support/tiny_sdxl.py): each tensor into its own text encoder, as
diffusers documents for SDXL embeddings (a file of two tensors is not a one-key state dict, so
it is loaded per encoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file

from blockctl.merge.embeddings import write_file
from tests.support.generation import generate
from tests.support.tiny_sdxl import WIDTH_1, WIDTH_2, build_sdxl


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusionXLPipeline:
    """Its two encoders have different widths, so a swapped key cannot load."""
    return build_sdxl()


def test_sdxl_embedding_loads_into_both_encoders(
    sdxl: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(1)
    rows = {
        "text_encoder": torch.randn(1, WIDTH_1, generator=gen),
        "text_encoder_2": torch.randn(1, WIDTH_2, generator=gen),
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
