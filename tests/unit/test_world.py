"""The procedural world and the demo concepts: deterministic, varied, captioned correctly."""

from __future__ import annotations

import time

import numpy as np
import pytest

from blockctl.toy.concepts import CONCEPTS, render_concept
from blockctl.toy.vocab import BACKGROUNDS, SHAPES, world_words
from blockctl.toy.world import (
    COLOR_RGB,
    HELD_OUT,
    held_out_captions,
    parse_caption,
    sample_batch,
    shape_mask,
)


def test_deterministic_by_seed() -> None:
    a, sa = sample_batch(16, seed=4)
    b, sb = sample_batch(16, seed=4)
    c, _ = sample_batch(16, seed=5)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8


def test_captions_match_what_is_drawn() -> None:
    images, scenes = sample_batch(200, seed=1)
    for img, sc in zip(images, scenes, strict=True):
        color, shape, bg = parse_caption(sc.caption)
        assert shape == sc.shape
        assert bg is None or bg == sc.background
        assert color is None or color == sc.color
        if sc.shape is not None and sc.color is not None:
            m = shape_mask(sc.shape, sc.cx, sc.cy, sc.r)
            assert m.sum() > 20
            assert (img[m] == np.array(COLOR_RGB[sc.color])).all()


def test_held_out_triples_never_drawn_in_pretraining() -> None:
    assert len(HELD_OUT) == 48 and len(set(held_out_captions())) == 48
    _, scenes = sample_batch(3000, seed=2)
    drawn = {(s.color, s.shape, s.background) for s in scenes}
    assert not drawn & HELD_OUT
    for cap in held_out_captions():
        c, s, b = parse_caption(cap)
        assert c and s and b and (c, s, b) in HELD_OUT


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders(shape: str) -> None:
    assert 40 < shape_mask(shape, 32, 32, 14).sum() < 64 * 64 / 2


def test_fast_enough_for_on_the_fly_training() -> None:
    t = time.perf_counter()
    sample_batch(500, seed=0)
    assert 500 / (time.perf_counter() - t) > 300  # ~3000/s unloaded; lenient for busy CI


def test_concepts_cover_four_kinds_with_known_class_words() -> None:
    assert len(CONCEPTS) >= 15
    assert {c.kind for c in CONCEPTS.values()} == {"subject", "person", "scene", "style"}
    words = set(world_words())
    for spec in CONCEPTS.values():
        assert spec.class_word in words, spec.name
        assert spec.name not in words  # a concept is new to the world
    assert not set(CONCEPTS) & set(BACKGROUNDS)


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_photos_vary_and_are_deterministic(name: str) -> None:
    a = render_concept(name, 4, seed=0)
    b = render_concept(name, 4, seed=0)
    assert [np.asarray(i).tobytes() for i, _ in a] == [np.asarray(i).tobytes() for i, _ in b]
    arrays = [np.asarray(i) for i, _ in a]
    assert all(x.shape == (64, 64, 3) for x in arrays)
    assert len({x.tobytes() for x in arrays}) == 4
    assert all(name in cap for _, cap in a)
