"""The trainable part of a concept: slot adapters on the target Linears and one token row.

A ``SlotLinear`` is a LoRA layer whose down-projection is GIVEN (``A_s``, cut from the
registry's basis, a frozen buffer) and whose up-projection ``B_s`` starts at zero, so training
starts exactly at the base model and every update stays inside the slot's subspace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockctl.adapter import TEXT_ENCODER, token_key, up_key
from blockctl.blocks import slot_down
from blockctl.clip_names import submodule
from blockctl.errors import InvalidInput
from blockctl.layout import Layout, Target


class SlotLinear(nn.Module):
    """``y = W x + scale · (x A_sᵀ) B_sᵀ``; ``enabled = False`` gives back the base layer."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, scale: float) -> None:
        super().__init__()
        if down.shape[1] != base.in_features:
            raise InvalidInput(
                f"slot basis is {down.shape[1]} wide but the layer takes {base.in_features}"
            )
        self.base = base
        self.scale = scale
        self.enabled = True
        self.register_buffer("down", down.to(base.weight.dtype).contiguous())
        self.up = nn.Parameter(torch.zeros(base.out_features, down.shape[0], dtype=torch.float32))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some diffusers code paths read ``to_k.weight``
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        down: torch.Tensor = self.down  # type: ignore[assignment]
        low = F.linear(x, down.to(x.dtype))
        return y + self.scale * F.linear(low, self.up.to(x.dtype))


class TokenEmbedding(nn.Module):
    """The text encoder's token embedding plus ONE trainable row for the concept token, and
    scratch rows for erasure prompts' stand-in tokens (roe.py).

    The original matrix stays frozen and is not copied, so merged tokenizers of several concepts
    never disagree about the ordinary vocabulary. Ids past the frozen matrix are looked up in a
    small table: ``token_id`` is the learnt row, ``token_id + 1 + j`` scratch row ``j``, set per
    step with ``set_scratch`` (no tokenizer entries: roe.tokenize_with_standins splices the ids
    in). ``enabled = False`` puts back the learnt row's starting value (the class word's
    embedding), i.e. the model before training.

    ``max_norm`` (when set) bounds the learnt row's norm; ``project_`` applies it after each
    optimizer step, keeping the token inside the vocabulary's range (docs/design.md §5).
    """

    def __init__(
        self, base: nn.Embedding, token_id: int, init: torch.Tensor, max_norm: float | None = None
    ) -> None:
        super().__init__()
        if token_id < base.num_embeddings:
            raise InvalidInput(f"token id {token_id} is inside the frozen vocabulary")
        self.base = base
        self.token_id = token_id
        self.enabled = True
        self.max_norm = max_norm
        self.row = nn.Parameter(init.detach().clone().float().reshape(1, -1))
        self.initial: torch.Tensor
        self.register_buffer("initial", init.detach().clone().float().reshape(1, -1))
        self.scratch: torch.Tensor
        self.register_buffer("scratch", torch.zeros(0, self.row.shape[1]), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def scratch_start(self) -> int:
        """The id of scratch row 0."""
        return self.token_id + 1

    def set_scratch(self, rows: torch.Tensor | None) -> None:
        """Stand-in embeddings for ids ``scratch_start + j`` (None: none)."""
        empty = torch.zeros(0, self.row.shape[1], device=self.row.device)
        self.scratch = empty if rows is None else rows.detach().float().to(self.row.device)

    @torch.no_grad()
    def project_(self) -> None:
        """Scale the learnt row back onto the norm ball, if it left it."""
        if self.max_norm is None:
            return
        norm = float(self.row.norm())
        if norm > self.max_norm:
            self.row.mul_(self.max_norm / norm)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        extra = input_ids >= self.base.num_embeddings
        # The new ids lie past the frozen matrix: look up row 0 there and overwrite it.
        safe = torch.where(extra, torch.zeros_like(input_ids), input_ids)
        out = self.base(safe)
        if not bool(extra.any()):
            return out
        table = torch.cat([self.row if self.enabled else self.initial, self.scratch])
        table = table.to(out.dtype)
        index = (input_ids - self.token_id).clamp(0, table.shape[0] - 1)
        return torch.where(extra.unsqueeze(-1), table[index], out)


class ConceptAdapter:
    """Every trainable piece of one concept and a switch for all of them at once: the slot
    layers and the token's row in each text encoder (one on SD, two on SDXL)."""

    def __init__(
        self,
        slots: Mapping[str, SlotLinear],
        embedding: TokenEmbedding | Mapping[str, TokenEmbedding],
        token: str,
    ):
        self.slots = dict(slots)
        embeddings = embedding if isinstance(embedding, Mapping) else {TEXT_ENCODER: embedding}
        self.embeddings: dict[str, TokenEmbedding] = dict(embeddings)
        self.embedding = self.embeddings[TEXT_ENCODER]  # the first encoder's, as on SD
        self.token = token

    def slot_parameters(self) -> list[nn.Parameter]:
        return [m.up for m in self.slots.values()]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [e.row for e in self.embeddings.values()]

    def set_enabled(self, enabled: bool) -> None:
        for m in self.slots.values():
            m.enabled = enabled
        for e in self.embeddings.values():
            e.enabled = enabled

    def project_(self) -> None:
        """Every token row back inside its own encoder's norm bound (after an optimizer step)."""
        for e in self.embeddings.values():
            e.project_()

    def set_scratch(self, rows: Mapping[str, torch.Tensor | None]) -> None:
        """Stand-in rows per text encoder (``TokenEmbedding.set_scratch``); absent: none."""
        for encoder, e in self.embeddings.items():
            e.set_scratch(rows.get(encoder))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's behaviour inside the block (for ROE targets and "before" samples)."""
        self.set_enabled(False)
        try:
            yield
        finally:
            self.set_enabled(True)

    @contextmanager
    def slots_disabled(self) -> Iterator[None]:
        """Slot updates off but the learnt token kept: ROE prompts never hold the token, so for
        them this equals the base model while keeping the embedding's autograd graph intact."""
        for m in self.slots.values():
            m.enabled = False
        try:
            yield
        finally:
            for m in self.slots.values():
                m.enabled = True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter file's tensors (docs/design.md §6)."""
        out = {up_key(name): m.up.detach().float().cpu().clone() for name, m in self.slots.items()}
        for encoder, e in self.embeddings.items():
            out[token_key(self.token, encoder)] = e.row.detach().float().cpu().clone()
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, m in self.slots.items():
                m.up.copy_(tensors[up_key(name)])
            for encoder, e in self.embeddings.items():
                e.row.copy_(tensors[token_key(self.token, encoder)])


def find_module(root: nn.Module, module: str) -> tuple[str, nn.Module]:
    """The live submodule for a layout module name, with or without ``text_model.``
    (clip_names): transformers 5 dropped that level of CLIPTextModel but not of
    CLIPTextModelWithProjection, and saved weights (hence layouts) may carry either."""
    try:
        return submodule(root, module)
    except AttributeError:
        raise InvalidInput(
            f"the base model has no module {module!r} (layout made for another base?)"
        ) from None


def attach(
    components: Mapping[str, nn.Module],
    layout: Layout,
    bases: Mapping[int, torch.Tensor],
    slot: int,
    tokenizer: object | Mapping[str, object],
    token: str,
    class_word: str,
    token_norm_bound: float = 0.0,
) -> ConceptAdapter:
    """Wrap every target of ``layout`` in ``components`` and add the concept token to every
    text encoder of the layout's family (``tokenizer``: the one tokenizer, or one per encoder
    by component name), each row initialised from the class word in that encoder and its norm
    bounded to ``token_norm_bound`` × that encoder's largest vocabulary row norm (0: none)."""
    slots: dict[str, SlotLinear] = {}
    for target in layout.targets:
        slots[target.name] = _wrap(components, target, bases, slot, layout)
    tokenizers = tokenizer if isinstance(tokenizer, Mapping) else {TEXT_ENCODER: tokenizer}
    embeddings = {}
    for encoder in layout.token_dims:
        if encoder not in components or encoder not in tokenizers:
            raise InvalidInput(f"the base's {encoder} or its tokenizer was not loaded")
        embeddings[encoder] = _add_token(
            components[encoder], tokenizers[encoder], token, class_word, token_norm_bound
        )
    return ConceptAdapter(slots, embeddings, token)


def _wrap(
    components: Mapping[str, nn.Module],
    target: Target,
    bases: Mapping[int, torch.Tensor],
    slot: int,
    layout: Layout,
) -> SlotLinear:
    root = components.get(target.component)
    if root is None:
        raise InvalidInput(f"target {target.name} is in an unknown component")
    name, linear = find_module(root, target.module)
    if not isinstance(linear, nn.Linear):
        raise InvalidInput(f"target {target.name} is a {type(linear).__name__}, not a Linear")
    if (linear.out_features, linear.in_features) != (target.out_features, target.in_features):
        raise InvalidInput(f"target {target.name} has another shape than the layout says")
    down = slot_down(bases[target.in_features], slot, layout.rank)
    wrapped = SlotLinear(linear, down, layout.scale)
    root.set_submodule(name, wrapped)
    return wrapped


def _add_token(
    text_encoder: nn.Module, tokenizer: object, token: str, class_word: str, bound: float
) -> TokenEmbedding:
    name, embedding = find_module(text_encoder, "text_model.embeddings.token_embedding")
    if not isinstance(embedding, nn.Embedding):
        raise InvalidInput("the text encoder's token embedding is not an nn.Embedding")
    if tokenizer.add_tokens([token]) != 1:  # type: ignore[attr-defined]
        raise InvalidInput(f"token {token!r} already exists in the base's tokenizer")
    token_id = int(tokenizer.convert_tokens_to_ids(token))  # type: ignore[attr-defined]
    class_ids = class_token_ids(tokenizer, class_word)
    weight = embedding.weight.detach()
    init = weight[class_ids].float().mean(dim=0)
    max_norm = bound * vocabulary_norms(weight).largest if bound > 0 else None
    wrapped = TokenEmbedding(embedding, token_id, init, max_norm)
    text_encoder.set_submodule(name, wrapped)
    return wrapped


@dataclass(frozen=True)
class NormRange:
    smallest: float
    median: float
    largest: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def vocabulary_norms(weight: torch.Tensor) -> NormRange:
    """The range of the vocabulary's row norms: where a learnt token row should stay."""
    norms = weight.detach().float().norm(dim=1)
    return NormRange(float(norms.min()), float(norms.median()), float(norms.max()))


def class_token_ids(tokenizer: object, word: str) -> Sequence[int]:
    ids = tokenizer(word, add_special_tokens=False).input_ids  # type: ignore[operator]
    if not ids:
        raise InvalidInput(f"class word {word!r} tokenizes to nothing")
    return [int(i) for i in ids]


def freeze(*modules: nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)
