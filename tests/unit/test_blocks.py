"""Slot math properties (docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockctl import blocks

WIDTHS = st.sampled_from([8, 12, 16, 32])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int]:
    width = draw(WIDTHS)
    rank = draw(st.integers(1, 4))
    slots = draw(st.integers(2, width // rank))
    return width, rank, slots


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 2**16))
def test_distinct_slots_are_orthogonal(layout: tuple[int, int, int], seed: int) -> None:
    width, rank, slots = layout
    basis = blocks.make_basis(width, seed)
    downs = [blocks.slot_down(basis, s, rank) for s in range(slots)]
    for s in range(slots):
        gram = downs[s] @ downs[s].T
        assert torch.allclose(gram, torch.eye(rank), atol=1e-6)
        for t in range(s + 1, slots):
            assert (downs[s] @ downs[t].T).abs().max() <= 1e-6


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 2**16), st.data())
def test_merge_of_any_subset_in_any_order_equals_sum_of_forwards(
    layout: tuple[int, int, int], seed: int, data: st.DataObject
) -> None:
    width, rank, slots = layout
    subset = data.draw(st.lists(st.integers(0, slots - 1), min_size=1, unique=True))
    order = data.draw(st.permutations(subset))
    gen = torch.Generator().manual_seed(seed)
    basis = blocks.make_basis(width, seed)
    out = 5
    weight = torch.randn(out, width, generator=gen)
    ups = {s: torch.randn(out, rank, generator=gen) for s in subset}
    scales = {s: float(torch.rand(1, generator=gen)) + 0.5 for s in subset}
    x = torch.randn(3, width, generator=gen)

    merged = blocks.apply_delta(
        weight, blocks.merged_delta({s: ups[s] for s in order}, basis, rank, scales)
    )
    separate = x @ weight.T + sum(
        x @ blocks.delta(ups[s], blocks.slot_down(basis, s, rank), scales[s]).T for s in subset
    )
    assert torch.allclose(x @ merged.T, separate, atol=1e-4)


def test_inputs_in_a_slot_subspace_see_only_that_slot() -> None:
    basis = blocks.make_basis(16, 3)
    gen = torch.Generator().manual_seed(0)
    ups = {s: torch.randn(4, 2, generator=gen) for s in range(4)}
    weight = torch.randn(4, 16, generator=gen)
    merged = blocks.apply_delta(weight, blocks.merged_delta(ups, basis, 2))
    own = blocks.apply_delta(weight, blocks.delta(ups[1], blocks.slot_down(basis, 1, 2)))
    x = torch.randn(5, 2, generator=gen) @ blocks.slot_down(basis, 1, 2)  # inside slot 1
    assert torch.allclose(x @ merged.T, x @ own.T, atol=1e-5)


def test_basis_is_orthonormal_and_seeded() -> None:
    a, b = blocks.make_basis(32, 7), blocks.make_basis(32, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, blocks.make_basis(32, 8))
    assert torch.allclose(a.T @ a, torch.eye(32), atol=1e-6)
    assert a.dtype == torch.float32


@pytest.mark.parametrize(
    ("slots", "rank", "widths"),
    [(17, 4, [64]), (80, 4, [320, 319]), (0, 4, [64]), (4, 0, [64]), (1, 1, [])],
)
def test_overflowing_or_empty_layouts_raise(slots: int, rank: int, widths: list[int]) -> None:
    with pytest.raises(blocks.LayoutError):
        blocks.check_capacity(slots, rank, widths)


def test_capacity_accepts_exact_fit() -> None:
    blocks.check_capacity(80, 4, [320, 768])


def test_wrong_shapes_raise() -> None:
    basis = blocks.make_basis(8, 0)
    with pytest.raises(blocks.LayoutError):
        blocks.slot_down(basis, 4, 2)  # columns 8..9 do not exist
    with pytest.raises(blocks.LayoutError):
        blocks.slot_down(torch.zeros(8, 4), 0, 2)
    with pytest.raises(blocks.LayoutError):
        blocks.delta(torch.zeros(3, 2), torch.zeros(3, 8))
    with pytest.raises(blocks.LayoutError):
        blocks.merged_delta({0: torch.zeros(3, 3)}, basis, 2)
    with pytest.raises(blocks.LayoutError):
        blocks.merged_delta({0: torch.zeros(3, 2), 1: torch.zeros(4, 2)}, basis, 2)
    with pytest.raises(blocks.LayoutError):
        blocks.stacked_down(basis, [1, 1], 2)
    with pytest.raises(blocks.LayoutError):
        blocks.apply_delta(torch.zeros(3, 8), torch.zeros(3, 7))


def test_foreign_share_sees_other_slots_only() -> None:
    basis = blocks.make_basis(16, seed=1)
    foreign = blocks.foreign_down(basis, slot=1, rank=2, slots=4)
    assert foreign.shape == (6, 16)
    own = blocks.slot_down(basis, 1, 2)
    free = basis[:, 8:].T  # columns no slot owns
    other = blocks.slot_down(basis, 3, 2)
    assert float(blocks.foreign_share(torch.randn(5, 2) @ own, foreign)) < 1e-10
    assert float(blocks.foreign_share(torch.randn(5, 8) @ free, foreign)) < 1e-10
    assert float(blocks.foreign_share(torch.randn(5, 2) @ other, foreign)) == pytest.approx(1.0)
    mixed = torch.randn(3, 2) @ other + torch.randn(3, 2) @ own
    assert 0.0 < float(blocks.foreign_share(mixed, foreign)) < 1.0
