"""Small Stable-Diffusion-architecture pipelines built from diffusers/transformers classes.

``TINY`` is for unit tests (builds and saves in well under a second); ``TOY`` is the shipped,
pretrained default base. Both have the layer names real SD 1.x has (attn1/attn2 ``to_q/to_k/
to_v/to_out.0``, CLIP ``q_proj/k_proj/v_proj/out_proj``) so every BlockLoRA code path is exercised.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Imported from their modules, not the lazy top-level namespace, so mypy sees the real classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from blockctl.atomic import atomic_write

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ToySpec:
    """Every size that defines a toy pipeline (the rest are diffusers/transformers defaults)."""

    image_size: int
    vae_channels: tuple[int, ...]  # one entry per VAE level; len-1 halvings of the image
    latent_channels: int
    vae_groups: int
    unet_channels: tuple[int, ...]  # one cross-attention down/up block per entry
    layers_per_block: int
    heads: tuple[int, ...]  # attention heads per UNet block (diffusers' "attention_head_dim")
    unet_groups: int
    time_dim: int  # UNet time-embedding width (diffusers default: 4x the first block)
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_tokens: int
    word_tokens: bool  # whole-word BPE tokens for the world's vocabulary (else characters only)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


TINY = ToySpec(
    image_size=32,
    vae_channels=(16, 32),
    latent_channels=4,
    vae_groups=8,
    unet_channels=(32, 64),
    layers_per_block=1,
    heads=(2, 4),
    unet_groups=8,
    time_dim=64,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_intermediate=64,
    max_tokens=32,
    word_tokens=False,
)

TOY = ToySpec(
    image_size=64,
    vae_channels=(32, 48, 48),
    latent_channels=4,
    vae_groups=16,
    # Two 128-wide levels: the widest that fits 15 MB in fp16 (256 on level 2 alone is 33 MB),
    # and faster per step on CPU than one 128-wide level at full latent resolution.
    unet_channels=(128, 128),
    layers_per_block=1,
    heads=(4, 4),
    unet_groups=32,
    time_dim=128,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    text_intermediate=256,
    max_tokens=32,
    word_tokens=True,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (GPT-2 byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by priority, the way the tokenizers BPE model does."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        ranked = [(r, i) for r, i in pairs if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token.

    New merges are only ever appended, and a lower-priority merge applies only when no earlier
    one does, so words already resolved stay resolved while later words are added.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if len(word) < 2:
            continue
        while True:
            symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
            if len(symbols) == 1:
                break
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_tokenizer_files(directory: str | Path, words: tuple[str, ...]) -> Path:
    """Write CLIP ``vocab.json`` + ``merges.txt``: every byte-level character (plain and
    end-of-word), whole-word tokens for ``words`` built by merges, then the special tokens.
    Unknown words fall back to characters; ``tokenizer.add_tokens`` works as for real CLIP."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for w in words:
        if not w.isascii() or not w.isalpha() or w != w.lower():
            raise ValueError(f"world word {w!r} must be lowercase ASCII letters")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = bpe_merges(words)
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for t in [*tokens, BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _load_tokenizer_files(directory: Path, max_tokens: int) -> CLIPTokenizer:
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges: Any = [tuple(line.split(" ")) for line in lines if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_pipeline(spec: ToySpec, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised SD pipeline of the given sizes, deterministic in ``seed``."""
    import tempfile

    from blockctl.toy.vocab import world_words

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp, world_words() if spec.word_tokens else ())
        tokenizer = _load_tokenizer_files(Path(tmp), spec.max_tokens)

    n = len(spec.vae_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.image_size,
    )
    m = len(spec.unet_channels)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * m,
        up_block_types=("CrossAttnUpBlock2D",) * m,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        attention_head_dim=spec.heads,
        cross_attention_dim=spec.text_hidden,
        norm_num_groups=spec.unet_groups,
        time_embedding_dim=spec.time_dim,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's noise schedule; DPM-Solver++ samples well in ~20 steps and trainers rebuild a
    # DDPMScheduler from this same config.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )
    parts: dict[str, Any] = dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return StableDiffusionPipeline(**parts)


def _write_vocab_files(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """Also write the classic ``vocab.json``/``merges.txt`` next to ``tokenizer.json`` so tools
    that read SD tokenizers the old way work too (added tokens stay in tokenizer.json)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text(
        "\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8"
    )


def save_pipeline(
    pipe: StableDiffusionPipeline, path: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Save as safetensors (never pickles) into a new or empty folder ``path``, atomically;
    ``dtype`` (e.g. float16) casts the copy on disk. Anything else at ``path`` is refused."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    original = pipe.unet.dtype
    with atomic_write(out) as staged:
        if dtype is not None:
            pipe.to(dtype=dtype)
        try:
            pipe.save_pretrained(staged.temp, safe_serialization=True)
        finally:
            if dtype is not None:
                pipe.to(dtype=original)  # the caller's pipeline is left as it was
        _write_vocab_files(pipe.tokenizer, staged.temp / "tokenizer")
        pickles = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
        for p in [p for p in staged.temp.rglob("*") if p.suffix in pickles]:
            p.unlink()  # belt and braces: nothing pickled ever ships
    return out
