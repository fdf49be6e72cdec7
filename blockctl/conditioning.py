"""How prompts become the UNet's conditioning, for either family (family.py). The trainer, its
learning-strength probe, eval's probe and the sample grid all go through here.

SD 1.x/2.x: the text encoder's last hidden state. SDXL, as diffusers' SDXL pipeline and its
SDXL training scripts build it: the penultimate hidden states of both encoders side by side
(768 + 1280 = 2048 wide on SDXL), ``text_encoder_2``'s projected pooled embedding
(``text_embeds``), and ``add_time_ids`` = (original height, original width, crop top, crop left,
target height, target width) per image.

Token ids of an SDXL prompt are ``(batch, 2, length)``: one row per tokenizer, since the two
tokenizers pad differently (SDXL's second pads with "!").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from blockctl.family import TextPart


@dataclass(frozen=True)
class Conditioning:
    hidden: torch.Tensor  # encoder_hidden_states (batch, length, width)
    pooled: torch.Tensor | None = None  # SDXL's text_embeds (batch, projection)

    def cat(self, other: Conditioning) -> Conditioning:
        hidden = torch.cat([self.hidden, other.hidden.to(self.hidden.dtype)])
        if self.pooled is None or other.pooled is None:
            return Conditioning(hidden)
        return Conditioning(hidden, torch.cat([self.pooled, other.pooled.to(self.pooled.dtype)]))

    def repeat_interleave(self, n: int) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        return Conditioning(self.hidden.repeat_interleave(n, dim=0), pooled)

    def rows(self, start: int, stop: int) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled[start:stop]
        return Conditioning(self.hidden[start:stop], pooled)


def micro_conditioning(
    original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> tuple[int, int, int, int, int, int]:
    """SDXL's micro-conditioning of one image: original (h, w), crop top-left (top, left),
    target (h, w)."""
    return (*original, *crop, *target)


def default_time_ids(size: int, n: int) -> torch.Tensor:
    """What the SDXL pipeline passes when generating a ``size``² image: nothing cropped."""
    row = micro_conditioning((size, size), (0, 0), (size, size))
    return torch.tensor([row] * n, dtype=torch.float32)


def tokenize(tokenizers: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``prompts``, padded as the text encoders expect: (n, L) for one tokenizer,
    (n, T, L) for T of them."""
    per_tokenizer = [
        tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]
    return stack_ids(per_tokenizer)


def stack_ids(per_tokenizer: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(per_tokenizer) == 1:
        return per_tokenizer[0]
    lengths = {ids.shape[-1] for ids in per_tokenizer}
    if len(lengths) != 1:
        raise ValueError(f"the tokenizers pad to different lengths {sorted(lengths)}")
    return torch.stack(list(per_tokenizer), dim=1)


def encode(encoders: Sequence[nn.Module], ids: torch.Tensor) -> Conditioning:
    """The UNet conditioning of token ids from ``tokenize`` (one encoder: SD; two: SDXL)."""
    if len(encoders) == 1:
        return Conditioning(encoders[0](ids)[0])
    hidden, pooled = [], None
    for i, encoder in enumerate(encoders):
        out = encoder(ids[:, i], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output, as the pipeline takes it
    assert pooled is not None and pooled.ndim == 2, "SDXL's last text encoder must project"
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def denoise(
    unet: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction; SDXL's also takes the pooled embedding and ``time_ids``, the
    ``add_time_ids`` (batch, 6)."""
    if cond.pooled is None:
        return unet(noisy, timesteps, cond.hidden).sample
    if time_ids is None:
        raise ValueError("an SDXL UNet needs add_time_ids")
    added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.device)}
    out = unet(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=added)
    return out.sample


def pool_at_end_token(encoder: nn.Module, tokenizer: Any) -> None:
    """Make a CLIP text encoder pool at the first end token, whatever its config says.

    SDXL's published text-encoder configs carry ``eos_token_id: 2`` (a pre-2023 value), with
    which transformers pools at the ARGMAX of the token ids: the end token for stock prompts, but
    an added concept token's position (its id is larger) as soon as one is in the prompt, so
    the pooled embedding would be that token's, not the prompt's. With the tokenizer's real end
    id, transformers pools at its first occurrence, which is what ComfyUI and A1111 pool at.
    blockctl sets it on every encoder it loads, so training, eval, samples and merged folders
    (whose configs it corrects) agree.
    """
    eos = int(tokenizer.eos_token_id)
    for module in encoder.modules():
        if "eos_token_id" in vars(module):  # CLIPTextModel (5.x) / CLIPTextTransformer (4.x)
            setattr(module, "eos_token_id", eos)  # noqa: B010 - not an nn.Module attribute
    config = getattr(encoder, "config", None)
    if config is not None:
        config.eos_token_id = eos


def load_text_part(folder: Path, part: TextPart, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """One text encoder of a pipeline folder and its tokenizer, the encoder pooling at the end
    token (``pool_at_end_token``)."""
    import transformers

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / part.tokenizer))
    encoder = getattr(transformers, part.model_class).from_pretrained(
        str(folder / part.encoder), dtype=dtype, use_safetensors=True
    )
    pool_at_end_token(encoder, tokenizer)
    return encoder, tokenizer
