"""The erasure prompt pool and loss: never the concept's token, always something elsewhere."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

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


def test_mix_gives_standin_and_empty_prompts_in_their_shares(pool: roe.ErasurePool) -> None:
    prompts = pool.sample(random.Random(3), 2000, roe.ErasureMix(standin=0.3, empty=0.1))
    standins = [p for p in prompts if roe.STANDIN in p]
    empty = [p for p in prompts if p == ""]
    assert 500 < len(standins) < 700 and 140 < len(empty) < 260
    assert all(p.count(roe.STANDIN) <= roe.MAX_STANDINS for p in standins)
    assert any("dog" in p for p in standins)  # the concept's own class with another token
    assert all("<rex>" not in p for p in prompts)


def test_no_mix_draws_exactly_as_before(pool: roe.ErasurePool) -> None:
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert pool.sample(rng_a, 50) == [pool._draw(rng_b) for _ in range(50)]


def test_standins_are_spliced_in_as_scratch_ids(char_tokenizer: object) -> None:
    tok: Any = char_tokenizer
    prompts = ["a photo of a dog", "a photo of {x} dog on a {x} background", "{x}", ""]
    ids, used = roe.tokenize_with_standins(tok, prompts, first_id=1000)
    plain = tok(prompts[:1] + prompts[3:], padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt").input_ids  # fmt: skip
    assert used == 3
    assert torch.equal(ids[0], plain[0]) and torch.equal(ids[3], plain[1])
    body = tok("a photo of", add_special_tokens=False).input_ids
    row = ids[1].tolist()
    assert row[0] == tok.bos_token_id and row[1 : 1 + len(body)] == body
    assert row[1 + len(body)] == 1000 and 1001 in row and row.count(tok.eos_token_id) >= 1
    assert ids[2].tolist()[:3] == [tok.bos_token_id, 1002, tok.eos_token_id]
    assert ids.shape == (4, tok.model_max_length)


def test_standin_rows_start_near_vocabulary_and_respect_the_bound() -> None:
    table = torch.randn(50, 8) * 0.2
    gen = torch.Generator().manual_seed(0)
    rows = roe.standin_rows(table, range(10, 20), 64, offset=1.0, max_norm=0.3, gen=gen)
    assert rows.shape == (64, 8) and float(rows.norm(dim=1).max()) <= 0.3 + 1e-6
    free = roe.standin_rows(table, [3], 4, 0.0, None, torch.Generator().manual_seed(0))
    assert torch.equal(free, table[[3, 3, 3, 3]])  # no offset: the anchor itself
    again = roe.standin_rows(table, range(10, 20), 64, 1.0, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)
