"""Concepts applied in memory to loaded diffusers modules: for sampling without writing a merged
model, and for measuring each concept on its own (``blockctl eval``).

The same ``MergePlan`` that the merge writers stream from supplies the deltas, so in-memory and
on-disk merges cannot disagree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockctl import blocks
from blockctl.errors import InvalidInput
from blockctl.merge import MergePlan


@dataclass
class Modules:
    """The parts of an SD pipeline that concepts touch."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> Modules:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from blockctl.quiet import quiet_libraries

        quiet_libraries()
        if not (folder / "model_index.json").is_file():
            raise InvalidInput(f"{folder} is not a diffusers pipeline folder")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        unet.eval()
        text.eval()
        return cls(unet, text, tok)

    def component(self, name: str) -> nn.Module:
        if name == "unet":
            return self.unet
        if name == "text_encoder":
            return self.text_encoder
        raise InvalidInput(f"unknown component {name!r}")


@contextmanager
def applied(plan: MergePlan, modules: Modules) -> Iterator[Modules]:
    """``modules`` with the plan's concepts added (and a tokenizer that knows their tokens);
    the targets' weights and the embedding are exactly restored on exit."""
    deltas = {(t.component, t.module): plan.delta(t) for t in plan.layout.targets}
    with deltas_applied(modules, deltas, plan.token_rows) as mod:
        yield mod


@contextmanager
def deltas_applied(
    modules: Modules,
    deltas: Mapping[tuple[str, str], torch.Tensor],
    token_rows: Sequence[tuple[str, torch.Tensor]] = (),
) -> Iterator[Modules]:
    """``modules`` with ``W + ΔW`` on each ``(component, module)`` Linear and ``token_rows``
    ((token, 1×dim) pairs) appended to the vocabulary; everything is restored on exit."""
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    embedding: Any = modules.text_encoder.get_input_embeddings()  # type: ignore[operator]
    old_embedding = embedding.weight.data
    tokenizer = copy.deepcopy(modules.tokenizer)
    try:
        with torch.no_grad():
            for (component, module), delta in deltas.items():
                layer = modules.component(component).get_submodule(module)
                assert isinstance(layer, nn.Linear)
                saved.append((layer, layer.weight.data))
                merged = blocks.apply_delta(layer.weight.data, delta)
                layer.weight.data = merged.to(layer.weight.dtype)
            if token_rows:
                tokenizer.add_tokens([tok for tok, _ in token_rows])  # type: ignore[attr-defined]
                rows = torch.cat([row for _, row in token_rows]).to(old_embedding.dtype)
                embedding.weight.data = torch.cat([old_embedding, rows])
        yield Modules(modules.unet, modules.text_encoder, tokenizer)
    finally:
        for layer, weight in saved:
            layer.weight.data = weight
        embedding.weight.data = old_embedding
