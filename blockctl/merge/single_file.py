"""Merge into one file in the original Stable Diffusion checkpoint layout (what A1111, ComfyUI
and diffusers' ``from_single_file`` read), streamed tensor by tensor.

SD 1.x/2.x: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP text encoder). SDXL (Stability's ``sgm`` layout): the same
UNet and VAE keys (plus ``label_emb.0.*``, SDXL's pooled-text and size embedding),
``conditioner.embedders.0.transformer.*`` for CLIP ViT-L and ``conditioner.embedders.1.model.*``
for OpenCLIP bigG in OpenCLIP's own naming: ``transformer.resblocks.N``, the q/k/v projections
fused into one ``attn.in_proj_weight``/``in_proj_bias``, and ``text_projection`` stored
transposed (OpenCLIP multiplies ``x @ text_projection``).

The key mapping is ours, derived from the UNet/VAE configs, so it covers any block count
(the toy bases have fewer blocks than SD 1.5). The text encoders keep the base's vocabulary:
those tools build their tokenizers from the stock CLIP vocabulary and load the embedding
matrices at their stock size, so the concept tokens go to textual-inversion embeddings beside
the file instead (``embeddings``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blockctl.clip_names import canonical_module, prefixed_module
from blockctl.errors import InvalidInput
from blockctl.family import Family
from blockctl.merge import embeddings
from blockctl.merge.plan import parse_dtype
from blockctl.merge.writers import computed_ahead, pause_mid_write
from blockctl.safetensors_io import (
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
# SDXL's text encoders (sgm's conditioner): a transformers CLIP model, then an OpenCLIP one.
SDXL_TEXT_PREFIXES = {
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + add_time_ids
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# OpenCLIP's names for the parts of a transformers CLIP text model (canonical spelling).
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # their order inside OpenCLIP's fused in_proj
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
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


@dataclass(frozen=True)
class Placement:
    """Where one diffusers tensor lives in the single file."""

    key: str  # the full original-layout key
    part: int | None = None  # which third (q, k, v) of a fused in_proj tensor it is
    transpose: bool = False  # stored transposed (OpenCLIP's text_projection)

    def extract(self, stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The diffusers tensor back from the stored one."""
        t = stored if self.part is None else stored.chunk(len(_QKV), dim=0)[self.part]
        return (t.T if self.transpose else t).reshape(shape)


def open_clip_placement(key: str) -> Placement | None:
    """A transformers CLIP text model tensor's OpenCLIP key (without the prefix); None for
    buffers OpenCLIP does not store (``position_ids``)."""
    name = canonical_module(key)
    if name == "text_projection.weight":
        return Placement("text_projection", transpose=True)
    if name in _OPEN_CLIP_FIXED:
        return Placement(_OPEN_CLIP_FIXED[name])
    if name == "embeddings.position_ids":
        return None
    if m := _CLIP_LAYER.match(name):
        layer, module, param = m[1], m[2], m[3]
        where = f"transformer.resblocks.{layer}"
        if module.startswith("self_attn.") and module.split(".")[-1] in _QKV:
            return Placement(
                f"{where}.attn.in_proj_{param}", part=_QKV.index(module.split(".")[-1])
            )
        if module in _OPEN_CLIP_LAYER:
            return Placement(f"{where}.{_OPEN_CLIP_LAYER[module]}.{param}")
    raise InvalidInput(f"cannot place text encoder tensor {key!r} in OpenCLIP's layout")


def placer(base: BaseFolder, family: Family, component: str) -> Callable[[str], Placement | None]:
    """diffusers key → its placement in the family's single-file layout, for one component of
    ``base`` (None: a buffer the layout does not store)."""
    if component in family.text_encoders:
        if not family.dual_text:
            return lambda key: Placement(TEXT_PREFIX + prefixed_module(key))
        prefix = SDXL_TEXT_PREFIXES[component]
        if component == "text_encoder":
            return lambda key: Placement(prefix + prefixed_module(key))

        def open_clip(key: str) -> Placement | None:
            found = open_clip_placement(key)
            return None if found is None else Placement(prefix + found.key, found.part,
                                                        found.transpose)  # fmt: skip

        return open_clip
    config = json.loads((base.component_dir(component) / "config.json").read_text())
    if component == "unet":
        return lambda key: Placement(UNET_PREFIX + unet_key(key, config))
    if component == "vae":
        return lambda key: Placement(VAE_PREFIX + vae_key(key, config))
    raise InvalidInput(f"{component!r} has no place in a single-file checkpoint")


def components(family: Family) -> tuple[str, ...]:
    """What a single file holds, in the order they are listed."""
    return ("unet", "vae", *family.text_encoders)


class SingleFile:
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        return [out, *embeddings.outputs(out, plan)]

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        beside = embeddings.record_entry(plan)
        write_single_file(plan, temps[0], parse_dtype(options.dtype), beside)
        return embeddings.write(plan, temps[1:], options, "single-file")


WRITER = SingleFile()


@dataclass(frozen=True)
class _Source:
    component: str
    file: Path
    entry: Entry  # as the base stores it


def write_single_file(
    plan: MergePlan,
    out: Path,
    dtype: torch.dtype | None,
    beside: Mapping[str, object] | None = None,
) -> None:
    """``beside``: what the merge record says about files written next to ``out``."""
    family = plan.layout.model_family
    # original-layout key -> its source tensors (three for a fused in_proj, in q, k, v order)
    sources: dict[str, list[tuple[int, _Source]]] = {}
    shapes: dict[str, Placement] = {}
    for component in components(family):
        place = placer(plan.base, family, component)
        for file in plan.base.weight_files(component):
            for entry in read_entries(file):
                where = place(entry.key)
                if where is None:
                    continue
                parts = sources.setdefault(where.key, [])
                if any(p == (where.part or 0) for p, _ in parts):
                    raise InvalidInput("two base tensors map to the same original-layout key")
                parts.append((where.part or 0, _Source(component, file, entry)))
                shapes[where.key] = where
    entries = []
    for key in sorted(sources):
        sources[key].sort(key=lambda item: item[0])
        entries.append(_out_entry(plan, key, shapes[key], [s for _, s in sources[key]], dtype))
    with contextlib.ExitStack() as stack:
        # Readers first: the writer, closed before them, may still be copying from them.
        files = dict.fromkeys(s.file for parts in sources.values() for _, s in parts)
        readers = {f: stack.enter_context(TensorReader(f)) for f in files}
        writer = stack.enter_context(
            StreamWriter(out, entries, plan.metadata("single-file", dtype, beside))
        )
        by_key = {e.key: e for e in entries}

        def copied(key: str) -> bool:  # the base's bytes as they are (maybe a new shape)
            parts = sources[key]
            if len(parts) != 1 or shapes[key].transpose:
                return False
            src = parts[0][1]
            return plan.passthrough(src.component, src.entry, dtype, tokens=False)

        def compute(key: str) -> torch.Tensor:
            parts = [
                plan.produce(s.component, s.entry.key, readers[s.file].get(s.entry.key), dtype,
                             tokens=False)
                for _, s in sources[key]
            ]  # fmt: skip
            if shapes[key].part is not None:
                return torch.cat(parts, dim=0)
            (tensor,) = parts
            if shapes[key].transpose:
                return tensor.T.contiguous()
            return tensor.reshape(by_key[key].shape)

        todo = [e.key for e in entries if not copied(e.key)]
        ahead = stack.enter_context(contextlib.closing(computed_ahead(todo, compute)))
        for i, e in enumerate(entries):
            if e.key in todo:
                done, tensor = next(ahead)
                assert done == e.key
                writer.write(e.key, tensor)
            else:
                ((_, src),) = sources[e.key]
                writer.copy(e.key, readers[src.file], src.entry.key)
            if i == 0:
                pause_mid_write()


def _out_entry(
    plan: MergePlan, key: str, where: Placement, parts: list[_Source], dtype: torch.dtype | None
) -> Entry:
    """The single file's entry for ``key``: the sources' dtype after the merge, their shape
    fused, transposed or (VAE attention) as the 1×1 convolution the original stores."""
    first = plan.out_entry(parts[0].component, parts[0].entry, dtype, tokens=False)
    shape = first.shape
    if where.part is not None:
        if len(parts) != len(_QKV):
            raise InvalidInput(f"{key}: the base lacks one of its q/k/v projections")
        shape = (shape[0] * len(_QKV), *shape[1:])
    elif where.transpose:
        shape = tuple(reversed(shape))
    elif parts[0].component == "vae" and is_vae_attention_weight(key, shape):
        shape = (*shape, 1, 1)
    return Entry(key, first.dtype, shape)
