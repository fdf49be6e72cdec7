"""Merge into one LoRA of rank |S|·r, for diffusers' ``load_lora_weights``, ComfyUI and
AUTOMATIC1111.

Per target: ``lora_A = [A_s; …]`` (stacked slot down-projections) and
``lora_B = [scale_s·B_s | …]``, so ``B @ A = Σ_s scale_s·B_s A_s`` exactly, with alpha = rank
(scaling 1). Keys are kohya style by default (``lora_unet_<module_>.lora_down.weight`` +
``.alpha``: what diffusers, ComfyUI and AUTOMATIC1111 all read) or peft style on request
(``unet.<module>.lora_A.weight``, diffusers' own). Text encoder modules are named under
``text_model.``, as those clients expect; on SDXL the kohya prefixes are ``lora_te1_`` and
``lora_te2_`` and the UNet goes by its original (sgm) module names, as kohya's sd-scripts write
SDXL LoRAs (``kohya_namer``). diffusers refuses LoRA files holding any key without "lora" in
it, so the concept tokens go to textual-inversion embeddings beside the file (``embeddings``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockctl.clip_names import prefixed_module
from blockctl.merge import embeddings
from blockctl.merge.plan import parse_dtype
from blockctl.merge.single_file import unet_key
from blockctl.merge.writers import pause_mid_write
from blockctl.safetensors_io import CODE_DTYPES, Entry, StreamWriter

if TYPE_CHECKING:
    from blockctl.base_model import BaseFolder
    from blockctl.family import Family
    from blockctl.layout import Target
    from blockctl.merge import MergeOptions, MergePlan

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads the LoraConfig from
UNET_KOHYA_PREFIX = "lora_unet_"


def client_module(target: Target) -> str:
    """The module name LoRA clients look for: text encoder layers under ``text_model.``
    (transformers 4 naming, which kohya, ComfyUI, AUTOMATIC1111 and diffusers all accept)."""
    if target.component.startswith("text_encoder"):
        return prefixed_module(target.module)
    return target.module


def peft_keys(target: Target) -> tuple[str, str]:
    name = f"{target.component}.{client_module(target)}"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def kohya_namer(base: BaseFolder, family: Family) -> Callable[[str, str], str]:
    """``(component, module)`` → its kohya LoRA name, as kohya's sd-scripts write them:
    ``lora_te_*`` (SD) or ``lora_te1_*``/``lora_te2_*`` (SDXL) + the text model's module path;
    ``lora_unet_*`` + the diffusers UNet path on SD, but the original (sgm) UNet path on SDXL
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``), since sd-scripts trains
    SDXL on the original UNet. diffusers, ComfyUI and AUTOMATIC1111 read both UNet spellings."""
    config = None
    if family.dual_text:
        config = json.loads((base.component_dir("unet") / "config.json").read_text())

    def name(component: str, module: str) -> str:
        if component == "unet":
            path = module
            if config is not None:
                path = unet_key(f"{module}.weight", config).removesuffix(".weight")
            return UNET_KOHYA_PREFIX + path.replace(".", "_")
        flat = prefixed_module(module).replace(".", "_")
        return family.part(component).kohya_prefix + flat

    return name


class LoraFile:
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        return [out, *embeddings.outputs(out, plan)]

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        beside = embeddings.record_entry(plan)
        write_lora(plan, temps[0], parse_dtype(options.dtype), options.lora_keys, beside)
        return embeddings.write(plan, temps[1:], options, "lora")


WRITER = LoraFile()


def _rank(plan: MergePlan) -> int:
    return len(plan.selected) * plan.layout.rank


def adapter_metadata(plan: MergePlan) -> dict[str, object]:
    """diffusers' packed LoraConfig kwargs, one set per component (``unet.r``, …). Target
    modules stay without ``text_model.``: peft matches them as name suffixes, so they find the
    layer in transformers 4 and 5 models alike."""
    out: dict[str, object] = {}
    for component in sorted({t.component for t in plan.layout.targets}):
        modules = sorted(t.module for t in plan.layout.targets if t.component == component)
        out[f"{component}.r"] = _rank(plan)
        out[f"{component}.lora_alpha"] = _rank(plan)
        out[f"{component}.target_modules"] = modules
    return out


def write_lora(
    plan: MergePlan,
    out: Path,
    dtype: torch.dtype | None,
    keys: str,
    beside: Mapping[str, object] | None = None,
) -> None:
    """``beside``: what the merge record says about files written next to ``out``."""
    targets = sorted(plan.layout.targets, key=lambda t: t.name)
    rank = _rank(plan)
    namer = kohya_namer(plan.base, plan.layout.model_family)

    def kohya_name(t: Target) -> str:
        return namer(t.component, t.module)

    entries: list[Entry] = []
    for t in targets:
        stored = plan.base.info(t.component, f"{t.module}.weight").dtype
        base_dtype = CODE_DTYPES.get(stored, torch.float32)
        wdtype = dtype or base_dtype
        down_shape, up_shape = (rank, t.in_features), (t.out_features, rank)
        if keys == "kohya":
            name = kohya_name(t)
            entries += [
                Entry(f"{name}.alpha", torch.float32, ()),
                Entry(f"{name}.lora_down.weight", wdtype, down_shape),
                Entry(f"{name}.lora_up.weight", wdtype, up_shape),
            ]
        else:
            a_key, b_key = peft_keys(t)
            entries += [Entry(a_key, wdtype, down_shape), Entry(b_key, wdtype, up_shape)]
    metadata = plan.metadata("lora", dtype, beside)
    if keys == "kohya":
        metadata |= {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    else:
        metadata[ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata(plan), sort_keys=True)
    by_key = {e.key: e for e in entries}
    with StreamWriter(out, entries, metadata) as writer:
        for i, t in enumerate(targets):
            down, up = plan.lora_factors(t)
            if keys == "kohya":
                name = kohya_name(t)
                writer.write(f"{name}.alpha", torch.tensor(float(rank)))
                pairs = [(f"{name}.lora_down.weight", down), (f"{name}.lora_up.weight", up)]
            else:
                a_key, b_key = peft_keys(t)
                pairs = [(a_key, down), (b_key, up)]
            for key, tensor in pairs:
                writer.write(key, tensor.to(by_key[key].dtype).contiguous())
            if i == 0:
                pause_mid_write()
