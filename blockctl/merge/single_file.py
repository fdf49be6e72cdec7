"""Merge into one file in the original Stable Diffusion 1.x checkpoint layout (what A1111,
ComfyUI and diffusers' ``from_single_file`` read): ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (CLIP text encoder).

The key mapping is ours, derived from the UNet/VAE configs, so it covers any block count
(the toy bases have fewer blocks than SD 1.5). The text encoder keeps the base's vocabulary:
those tools build their tokenizer from the stock CLIP vocabulary, so the concept tokens go to a
sidecar textual-inversion file (``<stem>.tokens.safetensors``) instead.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blockctl.clip_names import prefixed_module
from blockctl.errors import InvalidInput
from blockctl.merge.plan import parse_dtype
from blockctl.merge.writers import computed_ahead, pause_mid_write
from blockctl.safetensors_io import (
    CODE_DTYPES,
    Entry,
    StreamWriter,
    TensorReader,
    read_entries,
)

if TYPE_CHECKING:
    from blockctl.base_model import BaseFolder
    from blockctl.merge import MergeOptions, MergePlan

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # then text_model.*, as transformers 4 names it
COMPONENTS = ("unet", "vae", "text_encoder")

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a resnet, diffusers' names → the original ResBlock's Sequential indices.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def sidecar_path(out: Path) -> Path:
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.tokens.safetensors")


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_key(key: str, config: dict[str, Any]) -> str:
    """The original SD key of a diffusers UNet tensor (without ``model.diffusion_model.``)."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise InvalidInput("single-file export needs the same layers_per_block in every block")
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if m := _BLOCK.match(key):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        # A down block holds per resnets + a downsampler, an up block per + 1 resnets.
        index = (
            1 + block * (per + 1) + layer if side == "down_blocks" else block * (per + 1) + layer
        )
        name = "input_blocks" if side == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{name}.{index}.0.{_resnet(rest)}"
        return f"{name}.{index}.1.{rest}"
    if m := _SAMPLER.match(key):
        block, rest = int(m[2]), m[4]
        if m[1] == "down_blocks":
            return f"input_blocks.{(block + 1) * (per + 1)}.0.op.{rest}"
        has_attn = "Attn" in config["up_block_types"][block]
        return f"output_blocks.{block * (per + 1) + per}.{2 if has_attn else 1}.conv.{rest}"
    if m := _MID.match(key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        rest = _resnet(m[3]) if m[1] == "resnets" else m[3]
        return f"middle_block.{index}.{rest}"
    raise InvalidInput(f"cannot place UNet tensor {key!r} in the original SD layout")


def vae_key(key: str, config: dict[str, Any]) -> str:
    """The original SD key of a diffusers VAE tensor (without ``first_stage_model.``)."""
    n = len(config["up_block_types"])
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        level = int(m[3]) if m[2] == "down" else n - 1 - int(m[3])
        return f"{m[1]}.{m[2]}.{level}.block.{m[4]}.{m[5]}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)$", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN.get(m[2], m[2])}.{m[3]}"
    return key


def is_vae_attention_weight(ldm_key: str, shape: tuple[int, ...]) -> bool:
    """The original VAE attention projections are 1×1 convolutions, not linear layers."""
    return (
        ".mid.attn_1." in ldm_key
        and ldm_key.endswith("weight")
        and len(shape) == 2
        and (not ldm_key.endswith("norm.weight"))
    )


def key_mapper(base: BaseFolder, component: str) -> Callable[[str], str]:
    """diffusers key → full original-layout key, for one component of ``base``."""
    if component == "text_encoder":
        return lambda key: TEXT_PREFIX + prefixed_module(key)
    config = json.loads((base.component_dir(component) / "config.json").read_text())
    if component == "unet":
        return lambda key: UNET_PREFIX + unet_key(key, config)
    return lambda key: VAE_PREFIX + vae_key(key, config)


class SingleFile:
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        return [out, sidecar_path(out)] if plan.token_rows else [out]

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        dtype = parse_dtype(options.dtype)
        write_single_file(plan, temps[0], dtype)
        if len(temps) > 1:
            write_token_sidecar(plan, temps[1], dtype, "single-file")
            return [f"concept tokens are in {sidecar_path(options.out).name} (textual inversion)"]
        return []


WRITER = SingleFile()


def write_single_file(plan: MergePlan, out: Path, dtype: torch.dtype | None) -> None:
    # (original-layout key, component, source file, source entry, out entry)
    rows: list[tuple[str, str, Path, Entry, Entry]] = []
    for component in COMPONENTS:
        mapper = key_mapper(plan.base, component)
        for file in plan.base.weight_files(component):
            for entry in read_entries(file):
                ldm = mapper(entry.key)
                e = plan.out_entry(component, entry, dtype, tokens=False)
                if component == "vae" and is_vae_attention_weight(ldm, e.shape):
                    e = Entry(e.key, e.dtype, (*e.shape, 1, 1))
                rows.append((ldm, component, file, entry, Entry(ldm, e.dtype, e.shape)))
    rows.sort(key=lambda r: r[0])
    if len({r[0] for r in rows}) != len(rows):
        raise InvalidInput("two base tensors map to the same original-layout key")
    with contextlib.ExitStack() as stack:
        # Readers first: the writer, closed before them, may still be copying from them.
        readers = {
            f: stack.enter_context(TensorReader(f)) for f in dict.fromkeys(r[2] for r in rows)
        }
        writer = stack.enter_context(
            StreamWriter(out, [r[4] for r in rows], plan.metadata("single-file", dtype))
        )
        todo = {r[0]: r for r in rows if not plan.passthrough(r[1], r[3], dtype, tokens=False)}

        def compute(ldm: str) -> torch.Tensor:
            _, component, file, src, entry = todo[ldm]
            got = plan.produce(component, src.key, readers[file].get(src.key), dtype, tokens=False)
            return got.reshape(entry.shape)

        ahead = stack.enter_context(contextlib.closing(computed_ahead(list(todo), compute)))
        for i, (ldm, _component, file, src, _entry) in enumerate(rows):
            if ldm not in todo:
                writer.copy(ldm, readers[file], src.key)  # same bytes, maybe a new shape
            else:
                done, tensor = next(ahead)
                assert done == ldm
                writer.write(ldm, tensor)
            if i == 0:
                pause_mid_write()


def write_token_sidecar(plan: MergePlan, out: Path, dtype: torch.dtype | None, fmt: str) -> None:
    """One (1×dim) row per concept token, keyed by the token: load it with
    ``pipe.load_textual_inversion([{tok: row} for tok, row in rows.items()])``."""
    from blockctl.layout import TOKEN_EMBEDDING_KEY

    base_dtype = plan.base.info("text_encoder", TOKEN_EMBEDDING_KEY).dtype
    stored = dtype or CODE_DTYPES.get(base_dtype, torch.float32)
    rows = {tok: row.to(stored) for tok, row in plan.token_rows}
    entries = [Entry(tok, t.dtype, tuple(t.shape)) for tok, t in sorted(rows.items())]
    with StreamWriter(out, entries, plan.metadata(f"{fmt}-tokens", dtype)) as writer:
        for e in entries:
            writer.write(e.key, rows[e.key])
