"""What a merge offers to choose from: output formats and LoRA key styles. Light to import:
the CLI lists these values in its help and its parser refuses any other."""

from __future__ import annotations

from typing import Literal, get_args

MergeFormat = Literal["diffusers", "single-file", "lora"]
# kohya: what diffusers, ComfyUI and AUTOMATIC1111 all read, so the default.
LoraKeyStyle = Literal["kohya", "peft"]

FORMATS: tuple[str, ...] = get_args(MergeFormat)
LORA_KEYS: tuple[str, ...] = get_args(LoraKeyStyle)
DEFAULT_FORMAT: MergeFormat = "diffusers"
DEFAULT_LORA_KEYS: LoraKeyStyle = "kohya"
