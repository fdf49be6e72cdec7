"""A copy of a tokenizer that also knows a few concept tokens, cheap enough to make on every
switch of concepts.

``copy.deepcopy`` of SD's CLIP tokenizer (49,408 tokens, 48,894 merges) serialises and re-parses
the whole vocabulary: about 0.1 s, more than the weights' switch itself. A fast (``tokenizers``)
tokenizer's vocabulary and merges live in its model, which nothing here changes; only the added
tokens differ. So the copy is a new backend around the *same* model object (shared, not copied),
with the original's normalizer, pre-tokenizer, post-processor, decoder, padding, truncation and
added tokens, and then the concept tokens. Tokenizers of any other kind are deep-copied.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def with_added_tokens(tokenizer: Any, tokens: Sequence[str]) -> Any:
    """A tokenizer like ``tokenizer`` plus ``tokens`` (new ids from ``len(tokenizer)`` on, as
    ``add_tokens`` on a deep copy gives); ``tokenizer`` itself is not modified."""
    clone = _fork(tokenizer)
    if clone is None:
        clone = copy.deepcopy(tokenizer)
    clone.add_tokens(list(tokens))
    return clone


def _added(backend: Any) -> dict[int, tuple[object, ...]]:
    return {
        i: (t.content, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)
        for i, t in backend.get_added_tokens_decoder().items()
    }


def _fork(tokenizer: Any) -> Any:
    """A shallow copy of a transformers fast tokenizer with a backend of its own, or None where
    the tokenizer is of another kind or the copy would not be exact."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers requires tokenizers
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    fresh = Tokenizer(backend.model)  # the same model object: its vocabulary is not copied
    for part in _PARTS:
        value = getattr(backend, part)
        if value is not None:
            setattr(fresh, part, value)
    if backend.truncation:
        fresh.enable_truncation(**backend.truncation)
    if backend.padding:
        fresh.enable_padding(**backend.padding)
    fresh.encode_special_tokens = backend.encode_special_tokens
    for _, token in sorted(backend.get_added_tokens_decoder().items()):
        (fresh.add_special_tokens if token.special else fresh.add_tokens)([token])
    if _added(fresh) != _added(backend):  # e.g. added tokens whose ids have gaps
        return None
    clone = object.__new__(type(tokenizer))
    clone.__dict__.update(tokenizer.__dict__)
    clone._tokenizer = fresh
    return clone
