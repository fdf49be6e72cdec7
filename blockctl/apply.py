"""Concepts applied in memory to loaded diffusers modules: for sampling without writing a merged
model, and for measuring each concept on its own (``blockctl eval``).

The same ``MergePlan`` that the merge writers stream from supplies the deltas, so in-memory and
on-disk merges cannot disagree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockctl import blocks
from blockctl.clip_names import submodule
from blockctl.errors import InvalidInput
from blockctl.merge import MergePlan


@dataclass
class Modules:
    """The parts of an SD or SDXL pipeline that concepts touch."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: object = None
    vae_factor: int = 8  # pixels per latent cell (the image size SDXL's add_time_ids state)

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> Modules:
        import json

        from diffusers import UNet2DConditionModel

        from blockctl.base_model import BaseFolder
        from blockctl.conditioning import load_text_part
        from blockctl.family import family_of_pipeline
        from blockctl.quiet import quiet_libraries

        quiet_libraries()
        if not (folder / "model_index.json").is_file():
            raise InvalidInput(f"{folder} is not a diffusers pipeline folder")
        family = family_of_pipeline(BaseFolder(folder).pipeline_class())
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        unet.eval()
        texts = [load_text_part(folder, part, dtype) for part in family.text]
        for text, _ in texts:
            text.eval()
        (text, tok), *rest = texts
        text_2, tok_2 = rest[0] if rest else (None, None)
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return cls(unet, text, tok, text_2, tok_2, vae_factor=factor)

    def component(self, name: str) -> nn.Module:
        if name == "unet":
            return self.unet
        if name == "text_encoder":
            return self.text_encoder
        if name == "text_encoder_2" and self.text_encoder_2 is not None:
            return self.text_encoder_2
        raise InvalidInput(f"unknown component {name!r}")

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 else [])

    def tokenizers(self) -> list[Any]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.text_encoder_2 else [])


@contextmanager
def applied(plan: MergePlan, modules: Modules) -> Iterator[Modules]:
    """``modules`` with the plan's concepts added (and a tokenizer that knows their tokens);
    the targets' weights and the embedding are exactly restored on exit."""
    deltas = {(t.component, t.module): plan.delta(t) for t in plan.layout.targets}
    with deltas_applied(modules, deltas, plan.token_rows) as mod:
        if modules.text_encoder_2 is None:
            yield mod
            return
        # SDXL: the same tokens' rows in the second text encoder, through the same code path
        second = Modules(mod.unet, modules.text_encoder_2, modules.tokenizer_2)
        with deltas_applied(second, {}, plan.text_rows.get("text_encoder_2", ())) as added:
            yield replace(mod, tokenizer_2=added.tokenizer)


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
                _, layer = submodule(modules.component(component), module)
                assert isinstance(layer, nn.Linear)
                saved.append((layer, layer.weight.data))
                merged = blocks.apply_delta(layer.weight.data, delta)
                layer.weight.data = merged.to(layer.weight.dtype)
            if token_rows:
                tokenizer.add_tokens([tok for tok, _ in token_rows])  # type: ignore[attr-defined]
                rows = torch.cat([row for _, row in token_rows]).to(old_embedding.dtype)
                embedding.weight.data = torch.cat([old_embedding, rows])
        yield replace(modules, tokenizer=tokenizer)
    finally:
        for layer, weight in saved:
            layer.weight.data = weight
        embedding.weight.data = old_embedding
