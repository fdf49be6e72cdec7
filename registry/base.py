"""The registry interface: one shared layout, block slots handed out to contributors,
and the adapters published into them.

Backends store JSON-able records and files; they know nothing of tensors. The layout is
kept as the dict that ``blockctl.layout.Layout.to_dict`` produces.
"""

from __future__ import annotations

import abc
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
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
        SlotConflict when the concept or token clashes (by ``fold``) with any record, the
        slot is taken or no slot is free (``choose_slot``)."""

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
        raise no_slot(concept)

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

    @abc.abstractmethod
    def released_adapter_file(self, concept: str) -> tuple[AdapterRecord, Path] | None:
        """The withdrawn adapter of a released concept (both backends keep it), for
        ``mirror`` to reproduce a burnt slot; None if the concept was never published or is
        not released."""


# -- the rules both backends enforce, and their messages, in one place -----------------------

SLOT_FIELDS = tuple(f.name for f in fields(SlotRecord))
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def fold(name: str) -> str:
    """The one rule for "the same name", for concepts and tokens alike: Unicode compatibility
    normalisation (NFKC), full case folding, NFKC again (folding can denormalise). So
    ``Straße`` = ``STRASSE``, fullwidth ``ＲＥＸ`` = ``rex`` and ``K`` (Kelvin sign) = ``k``:
    concept names become file names on case-insensitive file systems, and tokenizers
    normalise and lowercase their input, so names that differ only there would collide later.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def concept_taken(held: SlotRecord, concept: str) -> SlotConflict:
    """``concept`` collides (by ``fold``: concepts become file names) with ``held``."""
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
    """``token`` collides (by ``fold``: tokenizers lowercase their input) with ``held``'s."""
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


def pool_exhausted(n: int, records: Iterable[SlotRecord]) -> SlotConflict:
    """All ``n`` slots are taken by ``records``."""
    counts = Counter(r.status for r in records)
    parts = [f"{counts[s]} {s}" for s in (RESERVED, PUBLISHED, RELEASED) if counts.get(s)]
    return SlotConflict(
        f"all {n} slots are taken ({', '.join(parts)})",
        hint="release an unpublished concept (blockctl release-slot CONCEPT) or create a "
        "registry with more slots",
    )


def no_slot(concept: str) -> SlotConflict:
    return SlotConflict(
        f"concept {concept!r} has no reserved slot",
        hint=f"blockctl reserve-slot {concept} --class-word WORD",
    )


def valid_slot_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_new_registry(layout: Any, basis_file: Path) -> Path:
    """The checks on ``create``'s input, before a backend writes anything."""
    if not isinstance(layout, dict):
        raise InvalidInput("the layout must be a dict")
    if not valid_slot_count(layout.get("slots")):
        raise InvalidInput(
            f"the layout needs a positive integer 'slots', got {layout.get('slots')!r}"
        )
    try:
        json.dumps(layout)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the layout is not JSON-serialisable: {exc}") from exc
    basis_file = Path(basis_file)
    if not basis_file.is_file():
        raise InvalidInput(f"basis file {basis_file} does not exist")
    return basis_file


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


def choose_slot(
    records: Sequence[SlotRecord], n: int, concept: str, token: str, slot: int | None
) -> int:
    """The slot a reservation gets, given every record of the registry (all statuses): the
    asked ``slot`` or the lowest free one. Raises when the slot is out of range, the concept
    or token clashes (by ``fold``) with any record, the slot is taken or none is free."""
    check_slot_in_range(slot, n)
    key = fold(concept)
    held = next((r for r in records if fold(r.concept) == key), None)
    if held is not None:
        raise concept_taken(held, concept)
    key = fold(token)
    held = next((r for r in records if fold(r.token) == key), None)
    if held is not None:
        raise token_taken(held, token)
    if slot is not None:
        held = next((r for r in records if r.slot == slot), None)
        if held is not None:
            raise slot_taken(held, slot)
        return slot
    chosen = lowest_free_slot({r.slot for r in records}, n)
    if chosen is None:
        raise pool_exhausted(n, records)
    return chosen


def check_release(held: SlotRecord | None, concept: str, owner: str | None) -> SlotRecord:
    """``held`` (the record of exactly ``concept``, or None) may be released by ``owner``."""
    if held is None:
        raise SlotConflict(f"concept {concept!r} has no reserved slot")
    if held.status == RELEASED:
        raise SlotConflict(
            f"concept {concept!r} was already released (slot {held.slot} stays retired)"
        )
    if owner is not None and owner != held.owner:
        raise SlotConflict(
            f"concept {concept!r} in slot {held.slot} is held by owner {held.owner}, not {owner}",
            hint=f"ask {held.owner} to release it",
        )
    return held


def check_release_input(concept: str, owner: str | None) -> None:
    check_concept(concept)
    if owner is not None:
        check_word("owner", owner)


def check_publish_input(concept: str, file: Path, sha256: str) -> tuple[Path, str]:
    """(the file, its lowercased sha256) after the checks on ``publish``'s own input."""
    check_concept(concept)
    sha = str(sha256).lower()
    if not SHA256_HEX.match(sha):
        raise InvalidInput(f"sha256 must be 64 hex digits, got {sha256!r}")
    file = Path(file)
    if not file.is_file():
        raise InvalidInput(f"adapter file {file} does not exist")
    return file, sha


def check_publishable(held: SlotRecord | None, concept: str) -> SlotRecord:
    if held is None:
        raise no_slot(concept)
    if held.status == RELEASED:
        raise SlotConflict(
            f"concept {concept!r} was released from slot {held.slot} and cannot be published again"
        )
    return held


def published_adapter(
    held: SlotRecord | None, adapter: AdapterRecord | None, concept: str
) -> AdapterRecord:
    """The adapter ``adapter_file`` may hand out for ``concept``: published, not withdrawn."""
    if held is None or adapter is None:
        raise SlotConflict(f"concept {concept!r} has no published adapter")
    if held.status == RELEASED:
        raise SlotConflict(
            f"concept {concept!r} was released from slot {held.slot}; its adapter is withdrawn"
        )
    return adapter


def sha_mismatch(file: Path, got: str, sha: str) -> ValidationFailed:
    return ValidationFailed(
        f"adapter file {file} has sha256 {got}, not the {sha} it was validated with",
        hint="the file changed after validation; validate it again",
    )
