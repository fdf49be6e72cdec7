"""The registry interface: one shared layout, block slots handed out to contributors,
and the adapters published into them.

Backends store JSON-able records and files; they know nothing of tensors. The layout is
kept as the dict that ``blockctl.layout.Layout.to_dict`` produces.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockctl.errors import InvalidInput, SlotConflict
from blockctl.names import check_concept, check_token, check_word

RESERVED = "reserved"
PUBLISHED = "published"
RELEASED = "released"


@dataclass(frozen=True)
class SlotRecord:
    slot: int
    concept: str
    token: str
    class_word: str
    owner: str
    status: str  # reserved | published | released
    reserved_at: str  # ISO-8601 UTC
    published_at: str | None = None
    released_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterRecord:
    concept: str
    slot: int
    sha256: str  # of the whole adapter file
    size: int  # bytes
    path: str  # where the backend stores it (backend-specific, informational)
    published_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry(abc.ABC):
    """One registry. Every method raises ``blockctl.errors`` subclasses on failure:
    ``RegistryUnavailable`` (exit 5) when the store is missing/corrupt/unreachable,
    ``SlotConflict`` (exit 3) for taken/exhausted/not-reserved, ``InvalidInput`` (exit 2).
    """

    location: str

    # -- creation and layout -------------------------------------------------
    @abc.abstractmethod
    def create(self, layout: dict[str, Any], basis_file: Path) -> None:
        """Create an empty registry bound to ``layout``; copies ``basis_file`` in.
        Refuses (InvalidInput) if a registry already exists here."""

    def exists(self) -> bool:
        """Whether a usable registry is already here (``create`` refuses one regardless)."""
        from blockctl.errors import RegistryUnavailable

        try:
            self.layout()
        except RegistryUnavailable:
            return False
        return True

    @abc.abstractmethod
    def layout(self) -> dict[str, Any]:
        """The layout dict given to ``create``."""

    @abc.abstractmethod
    def basis_path(self) -> Path:
        """A local path to ``basis.safetensors`` (for remote backends, a cached copy)."""

    # -- slots -----------------------------------------------------------------
    @abc.abstractmethod
    def reserve(
        self,
        concept: str,
        token: str,
        class_word: str,
        owner: str,
        slot: int | None = None,
    ) -> SlotRecord:
        """Atomically give ``concept`` the lowest free slot (or ``slot`` if asked).
        SlotConflict when the concept, token or slot is taken or no slot is free."""

    @abc.abstractmethod
    def release(self, concept: str, owner: str | None = None) -> SlotRecord:
        """Give up a concept's slot. Never published: the row goes and the slot returns to
        the pool. Published: status becomes ``released`` and the slot stays burnt (copies
        of its adapter may exist). SlotConflict if not reserved or owned by another
        ``owner`` (when given)."""

    @abc.abstractmethod
    def slots(self) -> list[SlotRecord]:
        """All slot records, by slot number."""

    def slot_for(self, concept: str) -> SlotRecord:
        for rec in self.slots():
            if rec.concept == concept:
                return rec
        raise SlotConflict(
            f"concept {concept!r} has no reserved slot",
            hint=f"blockctl reserve-slot {concept} --class-word WORD",
        )

    # -- adapters ----------------------------------------------------------------
    @abc.abstractmethod
    def publish(self, concept: str, file: Path, sha256: str) -> AdapterRecord:
        """Store an already validated adapter file for ``concept`` and mark its slot
        published, in one step. Re-publishing replaces the previous adapter. SlotConflict if
        the concept is not reserved or was released."""

    @abc.abstractmethod
    def adapters(self) -> list[AdapterRecord]:
        """Published adapters, by slot."""

    @abc.abstractmethod
    def adapter_file(self, concept: str) -> Path:
        """A local path to the concept's stored adapter file. SlotConflict if none."""


# -- conflict messages shared by the backends ------------------------------------------------


def concept_taken(held: SlotRecord, concept: str) -> SlotConflict:
    """``concept`` collides (ignoring case: concepts become file names) with ``held``."""
    if held.concept != concept:
        msg = (
            f"concept {concept!r} clashes with concept {held.concept!r} in slot "
            f"{held.slot} (owner {held.owner}); names are compared ignoring case"
        )
    elif held.status == RELEASED:
        msg = (
            f"concept {concept!r} was released from slot {held.slot} (owner "
            f"{held.owner}) and its name cannot be reused"
        )
    else:
        msg = (
            f"concept {concept!r} already holds slot {held.slot} (owner {held.owner}, "
            f"{held.status})"
        )
    return SlotConflict(msg, hint="choose another concept name")


def token_taken(held: SlotRecord, token: str) -> SlotConflict:
    """``token`` collides (ignoring case: CLIP lowercases its input) with ``held``'s token."""
    same = "" if held.token == token else f" as {held.token!r}"
    return SlotConflict(
        f"token {token!r} is already used{same} by concept {held.concept!r} (slot {held.slot})",
        hint="choose another trigger token",
    )


def slot_taken(held: SlotRecord, slot: int) -> SlotConflict:
    extra = ", released: slots of published adapters are never reused" * (held.status == RELEASED)
    return SlotConflict(
        f"slot {slot} is taken by concept {held.concept!r} (owner {held.owner}{extra})",
        hint="leave out the slot number to get the lowest free slot",
    )


def pool_exhausted(n: int, counts: Mapping[str, int]) -> SlotConflict:
    """All ``n`` slots taken; ``counts`` is the number of records per status."""
    parts = [f"{counts[s]} {s}" for s in (RESERVED, PUBLISHED, RELEASED) if counts.get(s)]
    return SlotConflict(
        f"all {n} slots are taken ({', '.join(parts)})",
        hint="release an unpublished concept (blockctl release-slot CONCEPT) or create a "
        "registry with more slots",
    )


def valid_slot_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_reservation(
    concept: str, token: str, class_word: str, owner: str, slot: int | None
) -> None:
    """The checks on a reservation's own input, before any backend looks at its slots."""
    check_concept(concept)
    check_token(token)
    check_word("class word", class_word)
    check_word("owner", owner)
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
        raise InvalidInput(f"slot must be an integer, got {slot!r}")


def check_slot_in_range(slot: int | None, n: int) -> None:
    if slot is not None and not 0 <= slot < n:
        raise InvalidInput(f"slot {slot} is out of range: this registry has slots 0..{n - 1}")


def lowest_free_slot(taken: set[int], n: int) -> int | None:
    return next((s for s in range(n) if s not in taken), None)
