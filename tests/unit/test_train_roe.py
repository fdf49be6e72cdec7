"""The erasure prompt pool and loss: never the concept's token, always something elsewhere."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockctl.toy.model import TINY, TOY, build_pipeline
from blockctl.toy.vocab import world_words
from blockctl.train import roe


@pytest.fixture(scope="module")
def char_tokenizer() -> object:
    return build_pipeline(TINY).tokenizer


@pytest.fixture(scope="module")
def pool(char_tokenizer: object) -> roe.ErasurePool:
    return roe.build_pool(char_tokenizer, "<rex>", "dog", "rex", ["<cat>", "cat", "<rex>", "rex"])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 16))
def test_pool_never_contains_the_token(pool: roe.ErasurePool, seed: int, n: int) -> None:
    prompts = pool.sample(random.Random(seed), n)
    assert len(prompts) == n
    assert all("<rex>" not in p for p in prompts)


def test_pool_mixes_class_vocabulary_random_strings_and_other_concepts(
    pool: roe.ErasurePool,
) -> None:
    prompts = pool.sample(random.Random(0), 400)
    assert "a photo of a dog" in prompts
    assert any("<cat>" in p or p.startswith("cat") for p in prompts)
    assert len(set(prompts)) > 100
    assert pool.others == ("<cat>", "cat")  # the concept's own name and token are excluded
    assert "rex" not in pool.words


def test_same_seed_same_prompts(pool: roe.ErasurePool) -> None:
    assert pool.sample(random.Random(5), 8) == pool.sample(random.Random(5), 8)


def test_vocabulary_is_the_toy_world_only_for_a_world_tokenizer(char_tokenizer: object) -> None:
    assert roe.vocabulary(char_tokenizer) == roe.ENGLISH_WORDS
    from blockctl.toy.model import _load_tokenizer_files, write_tokenizer_files

    folder = write_tokenizer_files(Path(__import__("tempfile").mkdtemp()), world_words())
    world_tok = _load_tokenizer_files(folder, TOY.max_tokens)
    assert roe.vocabulary(world_tok) == world_words()


def test_draw_follows_the_probability() -> None:
    rng = random.Random(1)
    hits = sum(roe.draw(rng, 0.3) for _ in range(4000))
    assert 1000 < hits < 1400
    assert not any(roe.draw(rng, 0.0) for _ in range(100))
    assert all(roe.draw(rng, 1.0) for _ in range(100))


def test_erasure_loss_is_mse_to_a_detached_target() -> None:
    student = torch.randn(2, 4, requires_grad=True)
    target = torch.randn(2, 4, requires_grad=True)
    loss = roe.erasure_loss(student, target)
    torch.testing.assert_close(loss, ((student - target) ** 2).mean())
    loss.backward()
    assert target.grad is None and student.grad is not None
