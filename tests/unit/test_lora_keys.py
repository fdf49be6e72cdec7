"""The merged LoRA's key names, for every target preset, against key lists built here from the
base's own modules and the clients' documented naming rules, not from blockctl's mapping:

- kohya style (sd-scripts; what ComfyUI's ``model_lora_keys_unet``/``model_lora_keys_clip``,
  AUTOMATIC1111's converter and diffusers' kohya converter read): ``lora_unet_`` + the diffusers
  UNet module path with ``.`` → ``_``; ``lora_te_text_model_encoder_layers_{i}_self_attn_{p}``
  for the CLIP text encoder (transformers 4 module names); each with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``;
- peft style (diffusers ``save_lora_weights``): ``unet.{module}`` and
  ``text_encoder.text_model.encoder.layers.{i}.self_attn.{p}``, each with
  ``.lora_A.weight`` and ``.lora_B.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from blockctl.merge import MergeOptions, merge
from tests.support.registries import make_published

PRESETS = {
    "attn": (("attn1", "attn2"), ("to_q", "to_k", "to_v", "to_out.0")),
    "cross-kv": (("attn2",), ("to_k", "to_v")),
}
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def unet_modules(base: Path, preset: str) -> list[str]:
    """The UNet's attention projections the preset names, from the model's own module tree."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(json.loads((base / "unet" / "config.json").read_text()))
    attentions, projections = PRESETS[preset]
    return [
        f"{name}.{p}"
        for name, _ in unet.named_modules()
        if name.rsplit(".", 1)[-1] in attentions
        for p in projections
    ]


def text_layers(base: Path) -> range:
    config = json.loads((base / "text_encoder" / "config.json").read_text())
    return range(config["num_hidden_layers"])


def expected_keys(base: Path, preset: str, text_encoder: bool, style: str) -> set[str]:
    unet = unet_modules(base, preset)
    layers = text_layers(base) if text_encoder else range(0)
    if style == "kohya":
        names = [f"lora_unet_{m.replace('.', '_')}" for m in unet] + [
            f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}"
            for i in layers
            for p in TEXT_PROJECTIONS
        ]
        suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
        return {f"{n}{s}" for n in names for s in suffixes}
    names = [f"unet.{m}" for m in unet] + [
        f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}"
        for i in layers
        for p in TEXT_PROJECTIONS
    ]
    return {f"{n}{s}" for n in names for s in (".lora_A.weight", ".lora_B.weight")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("text_encoder", [False, True])
def test_every_preset_writes_the_keys_clients_expect(
    tiny_base: Path, tmp_path: Path, preset: str, text_encoder: bool
) -> None:
    reg = make_published(
        tmp_path / "r", tiny_base, ("rex",), text_encoder=text_encoder, preset=preset
    )
    for style in ("kohya", "peft"):
        out = tmp_path / f"{style}.safetensors"
        merge(reg, ["rex"], MergeOptions(out=out, format="lora", lora_keys=style))
        with safe_open(str(out), framework="pt") as handle:
            keys = set(handle.keys())
        want = expected_keys(tiny_base, preset, text_encoder, style)
        assert keys == want, (style, sorted(keys ^ want)[:6])
