"""Merge into one LoRA of rank |S|·r, for diffusers' ``load_lora_weights``, ComfyUI and
AUTOMATIC1111.

Per target: ``lora_A = [A_s; …]`` (stacked slot down-projections) and
``lora_B = [scale_s·B_s | …]``, so ``B @ A = Σ_s scale_s·B_s A_s`` exactly, with alpha = rank
(scaling 1). Keys are kohya style by default (``lora_unet_<module_>.lora_down.weight`` +
``.alpha``: what diffusers, ComfyUI and AUTOMATIC1111 all read) or peft style on request
(``unet.<module>.lora_A.weight``, diffusers' own). Text encoder modules are named under
``text_model.``, as those clients expect. diffusers refuses LoRA files holding any key without
"lora" in it, so the concept tokens go to a sidecar textual-inversion file
(``<stem>.tokens.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockctl.clip_names import prefixed_module
from blockctl.merge.plan import parse_dtype
from blockctl.merge.single_file import sidecar_path, write_token_sidecar
from blockctl.merge.writers import pause_mid_write
from blockctl.safetensors_io import CODE_DTYPES, Entry, StreamWriter

if TYPE_CHECKING:
    from blockctl.layout import Target
    from blockctl.merge import MergeOptions, MergePlan

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads the LoraConfig from
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def client_module(target: Target) -> str:
    """The module name LoRA clients look for: text encoder layers under ``text_model.``
    (transformers 4 naming, which kohya, ComfyUI, AUTOMATIC1111 and diffusers all accept)."""
    if target.component == "text_encoder":
        return prefixed_module(target.module)
    return target.module


def peft_keys(target: Target) -> tuple[str, str]:
    name = f"{target.component}.{client_module(target)}"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def kohya_name(target: Target) -> str:
    return _KOHYA_PREFIX[target.component] + client_module(target).replace(".", "_")


class LoraFile:
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        return [out, sidecar_path(out)] if plan.token_rows else [out]

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        dtype = parse_dtype(options.dtype)
        write_lora(plan, temps[0], dtype, options.lora_keys)
        if len(temps) > 1:
            write_token_sidecar(plan, temps[1], dtype, "lora")
            return [f"concept tokens are in {sidecar_path(options.out).name} (textual inversion)"]
        return []


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


def write_lora(plan: MergePlan, out: Path, dtype: torch.dtype | None, keys: str) -> None:
    targets = sorted(plan.layout.targets, key=lambda t: t.name)
    rank = _rank(plan)
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
    metadata = plan.metadata("lora", dtype)
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
