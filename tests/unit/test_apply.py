"""The in-memory mechanism (``blockctl.apply``) and the cheap tokenizer copies it uses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from blockctl.apply import Modules, Overlay, deltas_applied
from blockctl.errors import InvalidInput
from blockctl.tokenizer_copy import _fork, with_added_tokens

PROMPTS = [
    "a photo of <rex> star on a <brick> background",
    "<rex><brick>x",
    "a red circle " * 40,  # truncated at the model length
    "<other> is not added",
    "",
]


@pytest.fixture(scope="module")
def toy_tokenizer() -> Any:
    """The shipped toy base's CLIP BPE tokenizer (word tokens and merges, like SD's)."""
    from transformers import CLIPTokenizer

    from blockctl.toy import weights_path

    return CLIPTokenizer.from_pretrained(str(weights_path() / "tokenizer"))


def encode(tokenizer: Any) -> list[list[int]]:
    return tokenizer(
        PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids


@pytest.mark.parametrize("which", ["toy", "tiny"])
def test_tokenizer_copy_equals_a_deep_copy_with_added_tokens(
    which: str, toy_tokenizer: Any, tiny_base: Path
) -> None:
    from transformers import CLIPTokenizer

    tok = (
        toy_tokenizer if which == "toy" else CLIPTokenizer.from_pretrained(tiny_base / "tokenizer")
    )
    plain = encode(tok)
    reference = copy.deepcopy(tok)
    reference.add_tokens(["<rex>", "<brick>"])
    assert _fork(tok) is not None  # the cheap path, not the deep-copy fallback
    fork = with_added_tokens(tok, ["<rex>", "<brick>"])
    assert fork._tokenizer is not tok._tokenizer
    assert len(fork) == len(reference) == len(tok) + 2
    assert fork.convert_tokens_to_ids(["<rex>", "<brick>"]) == [len(tok), len(tok) + 1]
    assert encode(fork) == encode(reference) != plain
    assert encode(tok) == plain and len(tok) == len(reference) - 2  # the original is untouched
    assert fork.decode(encode(fork)[0], skip_special_tokens=True) == reference.decode(
        encode(reference)[0], skip_special_tokens=True
    )


def test_other_tokenizers_are_deep_copied() -> None:
    class Plain:
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def add_tokens(self, tokens: list[str]) -> int:
            self.tokens += tokens
            return len(tokens)

    original = Plain()
    clone = with_added_tokens(original, ["<a>"])
    assert clone.tokens == ["<a>"] and original.tokens == []


def test_deltas_applied_restores_and_leaves_the_deltas_alone(tiny_base: Path) -> None:
    modules = Modules.load(tiny_base)
    key = ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    weight = modules.weight(key)
    original = weight.detach().clone()
    delta = torch.randn(weight.shape)
    kept = delta.clone()
    row = torch.randn(1, modules.text_encoder.get_input_embeddings().weight.shape[1])
    with deltas_applied(modules, {key: delta}, [("<new>", row)]) as mod:
        assert torch.equal(weight, original + delta)
        assert mod.tokenizer is not modules.tokenizer
        new_id = mod.tokenizer.convert_tokens_to_ids("<new>")  # type: ignore[attr-defined]
        assert torch.equal(modules.text_encoder.get_input_embeddings().weight[new_id], row[0])
    assert torch.equal(weight, original) and torch.equal(delta, kept)


def test_overlay_refuses_what_is_not_a_linear_weight(tiny_base: Path) -> None:
    modules = Modules.load(tiny_base)
    with pytest.raises(InvalidInput, match="has no module"):
        Overlay(modules, [("unet", "no.such.module")])
    with pytest.raises(InvalidInput, match="not a Linear layer"):
        Overlay(modules, [("unet", "mid_block")])
    key = ("unet", "conv_in")  # a 4-D weight
    with pytest.raises(InvalidInput, match="not a Linear layer"):
        Overlay(modules, [key])
    linear = ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    overlay = Overlay(modules, [linear])
    before = modules.weight(linear).detach().clone()
    with pytest.raises(InvalidInput, match="update is"):
        overlay.apply(lambda k: torch.zeros(3, 3))
    assert torch.equal(modules.weight(linear), before)


def test_spare_rows_grow_and_switching_rows_costs_no_vocabulary_copy(tiny_base: Path) -> None:
    modules = Modules.load(tiny_base)
    embedding = modules.text_encoder.get_input_embeddings()
    vocab = embedding.weight.detach().clone()
    dim = vocab.shape[1]
    overlay = Overlay(modules, [])
    rows = [(f"<t{i}>", torch.full((1, dim), float(i))) for i in range(40)]
    overlay.apply(lambda k: None, rows[:2])
    pointer = embedding.weight.data_ptr()
    overlay.apply(lambda k: None, rows[2:5])
    assert embedding.weight.data_ptr() == pointer  # the same spare buffer, new rows only
    tokenizer = overlay.apply(lambda k: None, rows)  # more than the spare room: it grows
    assert embedding.weight.shape[0] == vocab.shape[0] + 40
    assert torch.equal(embedding.weight[: vocab.shape[0]], vocab)
    assert tokenizer.convert_tokens_to_ids("<t39>") == vocab.shape[0] + 39
    assert torch.equal(embedding.weight[-1], rows[-1][1][0])
    assert overlay.restore() is modules.tokenizer
    assert torch.equal(embedding.weight, vocab)
