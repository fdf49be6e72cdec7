"""Concepts put into loaded diffusers modules in place: the one mechanism behind
``blockctl.compose`` (switching concepts in a live pipeline) and ``blockctl eval`` (measuring
each concept on its own).

An ``Overlay`` keeps the targeted weights once, as they were loaded. Every ``apply`` writes
``W + ΔW`` into them from those kept originals (the sum in float32, rounded once to the weight's
dtype), so switching never accumulates rounding, and ``restore`` copies the original bits back:
no subtraction anywhere. Token rows go into a spare buffer behind the embedding matrix; the
tokenizer that knows their tokens is a copy. The original embedding tensor and tokenizer are
never modified.

The same ``MergePlan`` that the merge writers stream from supplies the deltas, so in-memory and
on-disk merges cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockctl.clip_names import submodule
from blockctl.errors import InvalidInput
from blockctl.merge import MergePlan
from blockctl.tokenizer_copy import with_added_tokens

Key = tuple[str, str]  # (component, module), e.g. ("unet", "mid_block.attentions.0…attn2.to_k")
# ΔW (float32) for a key, or None to leave that weight as it was loaded.
DeltaSource = Callable[[Key], torch.Tensor | None]
TokenRows = Sequence[tuple[str, torch.Tensor]]  # (token, 1×dim) pairs


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

    def weight(self, key: Key) -> torch.Tensor:
        """The weight of the Linear layer at ``key`` (a peft-wrapped layer's base weight too)."""
        component, module = key
        try:
            _, layer = submodule(self.component(component), module)  # either CLIP spelling
        except AttributeError:
            raise InvalidInput(f"the {component} has no module {module!r}") from None
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise InvalidInput(f"{component}.{module} is not a Linear layer")
        return weight


class Overlay:
    """Deltas and token rows laid over loaded modules, switchable any number of times.

    The targeted weights are copied once, here; ``apply`` and ``restore`` write into the live
    parameters in place (their storage, device and dtype stay as they are, so compiled graphs
    and optimisers holding them keep working). Not thread-safe: callers serialise.
    """

    def __init__(self, modules: Modules, keys: Iterable[Key]) -> None:
        self._weights = {key: modules.weight(key) for key in keys}
        self._originals = {key: w.detach().clone() for key, w in self._weights.items()}
        self._changed: set[Key] = set()
        self._embedding: Any = modules.text_encoder.get_input_embeddings()  # type: ignore[operator]
        self._vocab: torch.Tensor = self._embedding.weight.data
        self._spare: torch.Tensor | None = None  # vocabulary + room for token rows
        self.tokenizer = modules.tokenizer  # the original, never modified

    def apply(self, delta_of: DeltaSource, token_rows: TokenRows = ()) -> Any:
        """Every kept weight becomes ``W + delta_of(key)`` (or ``W`` where that is None) and the
        vocabulary gains ``token_rows``; returns the tokenizer that knows their tokens. On any
        error everything is restored before it propagates."""
        try:
            tokenizer = self._put_tokens(token_rows)
            with torch.no_grad():
                for key, weight in self._weights.items():
                    self._put_weight(key, weight, delta_of(key))
        except BaseException:
            self.restore()
            raise
        return tokenizer

    def _put_weight(self, key: Key, weight: torch.Tensor, delta: torch.Tensor | None) -> None:
        original = self._originals[key]
        if delta is None:
            if key in self._changed:
                weight.copy_(original)
                self._changed.discard(key)
            return
        if delta.shape != weight.shape:
            raise InvalidInput(
                f"{'.'.join(key)}: update is {tuple(delta.shape)} but the weight is "
                f"{tuple(weight.shape)}"
            )
        # ΔW + W promotes W to float32 exactly and rounds the float32 sum once into the weight's
        # dtype: the merge's (W + ΔW).to(dtype) (blocks.apply_delta) bit for bit, in one pass
        # and without a temporary.
        torch.add(delta.to(weight.device, torch.float32), original, out=weight)
        self._changed.add(key)

    def _put_tokens(self, token_rows: TokenRows) -> Any:
        if not token_rows:
            self._embedding.weight.data = self._vocab
            return self.tokenizer
        tokens = [tok for tok, _ in token_rows]
        rows = self._vocab.shape[0]
        tokenizer = with_added_tokens(self.tokenizer, tokens)
        ids = [tokenizer.convert_tokens_to_ids(tok) for tok in tokens]
        if ids != list(range(rows, rows + len(tokens))):  # what the merged folder would assign
            raise InvalidInput(
                f"cannot add the concept tokens {tokens}: the tokenizer gave them ids {ids}, not "
                f"new ones after the text encoder's {rows} embedding rows"
            )
        spare = self._spare_rows(rows + len(tokens))
        new = torch.cat([row.reshape(1, -1) for _, row in token_rows])
        spare[rows : rows + len(tokens)] = new.to(spare.device, spare.dtype)
        # A view: switching costs the new rows, not a copy of the whole vocabulary.
        self._embedding.weight.data = spare[: rows + len(tokens)]
        return tokenizer

    def _spare_rows(self, needed: int) -> torch.Tensor:
        spare = self._spare
        if spare is None or spare.shape[0] < needed:
            rows, dim = self._vocab.shape
            size = max(needed, rows + 16, 2 * needed - rows)  # grow geometrically
            spare = torch.empty(size, dim, dtype=self._vocab.dtype, device=self._vocab.device)
            spare[:rows] = self._vocab
            self._spare = spare
        return spare

    def restore(self) -> Any:
        """Back to the weights, embedding and tokenizer as loaded, bit for bit."""
        with torch.no_grad():
            for key in self._changed:
                self._weights[key].copy_(self._originals[key])
        self._changed.clear()
        self._embedding.weight.data = self._vocab
        return self.tokenizer


def plan_deltas(plan: MergePlan) -> DeltaSource:
    """The plan's ``Σ scale_s·B_s A_s`` per target, computed when asked (one at a time, so at
    most one float32 delta is alive)."""
    targets = {(t.component, t.module): t for t in plan.layout.targets}

    def delta_of(key: Key) -> torch.Tensor | None:
        target = targets.get(key)
        return plan.delta(target) if target is not None else None

    return delta_of


@contextmanager
def applied(plan: MergePlan, modules: Modules) -> Iterator[Modules]:
    """``modules`` with the plan's concepts added (and a tokenizer that knows their tokens);
    the targets' weights and the embedding are exactly restored on exit."""
    keys = [(t.component, t.module) for t in plan.layout.targets]
    with _overlaid(modules, keys, plan_deltas(plan), plan.token_rows) as mod:
        if modules.text_encoder_2 is None:
            yield mod
            return
        # SDXL: the same tokens' rows in the second text encoder, through the same Overlay
        second = Modules(mod.unet, modules.text_encoder_2, modules.tokenizer_2)
        rows = plan.text_rows.get("text_encoder_2", ())
        with _overlaid(second, (), lambda key: None, rows) as added:
            yield replace(mod, tokenizer_2=added.tokenizer)


@contextmanager
def deltas_applied(
    modules: Modules,
    deltas: Mapping[Key, torch.Tensor],
    token_rows: TokenRows = (),
) -> Iterator[Modules]:
    """``modules`` with ``W + ΔW`` on each ``(component, module)`` Linear and ``token_rows``
    ((token, 1×dim) pairs) appended to the vocabulary; everything is restored on exit."""
    with _overlaid(modules, deltas.keys(), deltas.get, token_rows) as mod:
        yield mod


@contextmanager
def _overlaid(
    modules: Modules, keys: Iterable[Key], delta_of: DeltaSource, token_rows: TokenRows
) -> Iterator[Modules]:
    overlay = Overlay(modules, keys)
    tokenizer = overlay.apply(delta_of, token_rows)
    try:
        yield replace(modules, tokenizer=tokenizer)
    finally:
        overlay.restore()
