"""The sample-level identity distance: blind to a texture's phase, sees the concept."""

from __future__ import annotations

import numpy as np
import pytest

from blockctl.sample_identity import distance, identity, palette
from blockctl.toy.concepts import CONCEPTS, with_and_without
from blockctl.toy.world import COLOR_RGB, draw_background, shape_mask


def _phase_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bg = draw_background("striped", rng)
    shifted = np.roll(bg, (3, 5), axis=(0, 1))
    mask = shape_mask("star", 30, 30, 12)
    for img in (bg, shifted):
        img[mask] = COLOR_RGB["red"]
    return bg, shifted


def test_shapes_and_ranges() -> None:
    img = np.zeros((64, 64, 3), np.float32)
    assert palette(img).shape == (64 * 64, 3)
    white = np.full((64, 64, 3), 255.0, np.float32)
    assert distance(img, img) == 0.0
    assert distance(img, white) == pytest.approx(1.0)  # the largest possible
    # a tone shift of a few levels moves the distance a little, not by a bin's worth
    assert distance(img + 100, img + 104) == pytest.approx(4 / 255)


@pytest.mark.parametrize("name", ["rex", "alice", "brick", "vangogh"])
def test_a_concept_is_farther_than_any_phase_shift(name: str) -> None:
    """The median concept pair beats the worst phase pair (a plain star drawn orange is rex
    without its spots: close, and rightly so); a texture's phase shift costs nothing."""
    worst_phase = max(distance(*_phase_pair(seed)) for seed in range(20))
    assert CONCEPTS[name].kind  # one of each kind
    concept = [distance(*with_and_without(name, seed)) for seed in range(5)]
    assert float(np.median(concept)) > worst_phase
    assert worst_phase < 0.005  # a roll keeps every pixel value but those the shape hides


def test_identity_is_one_when_merged_matches_and_zero_at_the_base() -> None:
    a, b = with_and_without("dotty", 0)
    assert identity([a], [a], [b]) == pytest.approx(1.0)
    assert identity([b], [a], [b]) == pytest.approx(0.0)
    assert identity([a], [a], [a]) is None  # the concept changed nothing: nothing to keep
    with pytest.raises(ValueError):
        identity([a], [a, a], [b])
