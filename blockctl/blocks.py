"""Blockwise LoRA slot math: tensors in, tensors out, no I/O.

A registry owns, per distinct input width ``d``, one orthonormal basis ``O_d`` (d×d).
Slot ``s`` of rank ``r`` owns columns ``s·r … s·r+r−1``; its frozen down-projection is
``A_s = O_d[:, s·r:(s+1)·r]ᵀ`` (r×d) and its update is ``ΔW_s = scale · B_s A_s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class LayoutError(ValueError):
    """A layout, slot or shape that cannot work."""


def check_capacity(slots: int, rank: int, widths: Sequence[int]) -> None:
    """``N·r ≤ d_min``: every slot needs ``r`` basis columns of its own in every target."""
    if slots < 1:
        raise LayoutError(f"number of slots must be at least 1, got {slots}")
    if rank < 1:
        raise LayoutError(f"rank must be at least 1, got {rank}")
    if not widths:
        raise LayoutError("a layout needs at least one target module")
    d_min = min(widths)
    if slots * rank > d_min:
        raise LayoutError(
            f"{slots} slots of rank {rank} need {slots * rank} basis vectors, but the "
            f"narrowest target is only {d_min} wide (at most {d_min // rank} slots of rank {rank})"
        )


def make_basis(width: int, seed: int) -> torch.Tensor:
    """An orthonormal ``width×width`` float32 matrix from a seed: QR of a Gaussian with the
    column signs fixed so that ``R`` has a positive diagonal (QR alone is sign-ambiguous).

    Registries store the result instead of regenerating it: QR is not bit-reproducible
    across BLAS builds.
    """
    if width < 1:
        raise LayoutError(f"basis width must be positive, got {width}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + width)
    gauss = torch.randn(width, width, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32).contiguous()


def make_bases(widths: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    return {d: make_basis(d, seed) for d in sorted(set(widths))}


def slot_columns(slot: int, rank: int) -> slice:
    return slice(slot * rank, (slot + 1) * rank)


def slot_down(basis: torch.Tensor, slot: int, rank: int) -> torch.Tensor:
    """``A_s`` (rank×d) for one slot."""
    d = _square(basis)
    if slot < 0 or (slot + 1) * rank > d:
        raise LayoutError(f"slot {slot} of rank {rank} does not fit a basis of width {d}")
    return basis[:, slot_columns(slot, rank)].T.contiguous()


def stacked_down(basis: torch.Tensor, slots: Sequence[int], rank: int) -> torch.Tensor:
    """``[A_s; A_t; …]`` ((k·rank)×d) for several slots, in the order given."""
    if len(set(slots)) != len(slots):
        raise LayoutError(f"slots must be distinct, got {list(slots)}")
    if not slots:
        raise LayoutError("at least one slot is needed")
    return torch.cat([slot_down(basis, s, rank) for s in slots], dim=0)


def delta(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``ΔW = scale · B A`` with ``B`` (out×r) and ``A`` (r×d)."""
    if up.ndim != 2 or down.ndim != 2:
        raise LayoutError(
            f"B and A must be matrices, got {tuple(up.shape)} and {tuple(down.shape)}"
        )
    if up.shape[1] != down.shape[0]:
        raise LayoutError(
            f"B is {tuple(up.shape)} but A is {tuple(down.shape)}: inner ranks differ"
        )
    return scale * (up.to(torch.float32) @ down.to(torch.float32))


def merged_delta(
    ups: Mapping[int, torch.Tensor],
    basis: torch.Tensor,
    rank: int,
    scales: Mapping[int, float] | None = None,
) -> torch.Tensor:
    """``Σ_s scale_s · B_s A_s`` for the slots in ``ups`` as ONE matmul:
    ``[scale_s B_s | …] @ [A_s; …]``. Exact up to float rounding, in any slot order."""
    if not ups:
        raise LayoutError("at least one slot is needed")
    order = sorted(ups)
    d = _square(basis)
    blocks = []
    for s in order:
        b = ups[s]
        if b.ndim != 2 or b.shape[1] != rank:
            raise LayoutError(f"B for slot {s} must be (out×{rank}), got {tuple(b.shape)}")
        factor = 1.0 if scales is None else float(scales.get(s, 1.0))
        blocks.append(b.to(torch.float32) * factor)
    outs = {b.shape[0] for b in blocks}
    if len(outs) != 1:
        raise LayoutError(f"B blocks disagree on output width: {sorted(outs)}")
    up = torch.cat(blocks, dim=1)
    down = stacked_down(basis.to(torch.float32), order, rank)
    assert down.shape[1] == d
    return up @ down


def apply_delta(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` computed in float32, returned in float32 (callers cast at the end)."""
    if weight.shape != update.shape:
        raise LayoutError(f"weight is {tuple(weight.shape)} but update is {tuple(update.shape)}")
    return weight.to(torch.float32) + update


def _square(basis: torch.Tensor) -> int:
    if basis.ndim != 2 or basis.shape[0] != basis.shape[1]:
        raise LayoutError(f"a basis must be square, got {tuple(basis.shape)}")
    return int(basis.shape[0])


def foreign_down(basis: torch.Tensor, slot: int, rank: int, slots: int) -> torch.Tensor:
    """The down-projections of every slot of the layout except ``slot``, stacked
    (((slots−1)·rank)×d): the subspace where other concepts' updates read their inputs."""
    others = [s for s in range(slots) if s != slot]
    return stacked_down(basis, others, rank)


def foreign_share(change: torch.Tensor, foreign: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The share of ``change``'s energy (rows of width d) inside the foreign subspace, in
    [0, 1]: 0 = no other slot's update can see the change. ``foreign`` has orthonormal rows."""
    inside = (change @ foreign.T.to(change.dtype)).pow(2).sum()
    return inside / (change.pow(2).sum() + eps)
