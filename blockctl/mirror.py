"""Copy one registry into another (a Hub registry into a local folder, or back with --push).

Works through the ``Registry`` interface only, so any pair of backends can be mirrored. The
target is created with the source's layout and basis if absent; otherwise its layout must be
the same. Each source slot record is reproduced at the same slot number with the same
concept, token, class word and owner; published adapters are copied with their sha256
checked against the source's record; released slots are reproduced by reserve + publish +
release, so they stay burnt in the target too.

What cannot be reproduced through the interface (reported, never guessed):
- timestamps: the target records when IT reserved/published/released;
- a released slot whose withdrawn adapter the source no longer holds (``released_adapter_file``
  gives None): it is skipped, reported, and stays free in the target.
The mirror never deletes or un-publishes anything in the target. Running it again copies only
what changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import sha256_file
from registry.base import (
    PUBLISHED,
    RELEASED,
    RESERVED,
    AdapterRecord,
    Registry,
    SlotRecord,
    fold,
)


@dataclass(frozen=True)
class MirrorReport:
    source: str
    target: str
    created: bool  # the target registry was created by this mirror
    reserved: tuple[str, ...] = ()  # concepts newly reserved in the target
    copied: tuple[str, ...] = ()  # adapters copied (sha256 verified)
    released: tuple[str, ...] = ()  # concepts released in the target to match the source
    unchanged: int = 0  # source records already identical in the target
    notes: tuple[str, ...] = field(default=())  # states that were not (or could not be) copied

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mirror(source: Registry, target: Registry) -> MirrorReport:
    """Make ``target`` hold every record and adapter of ``source`` (see the module doc)."""
    if source.location == target.location:
        raise InvalidInput(f"cannot mirror {source.location} onto itself")
    layout = source.layout()
    created = not target.exists()
    if created:
        basis = source.basis_path()
        _check_sha(basis, str(layout.get("basis_sha256", "")), f"{source.location} basis")
        target.create(layout, basis)
    else:
        _check_same_layout(source, layout, target)

    src = source.slots()
    published = {a.concept: a for a in source.adapters()}
    tgt = {r.concept: r for r in target.slots()}
    tgt_adapters = {a.concept: a for a in target.adapters()}
    _check_conflicts(src, tgt, target.location)

    reserved: list[str] = []
    copied: list[str] = []
    released: list[str] = []
    notes: list[str] = []
    unchanged = 0
    for rec in src:
        have = tgt.get(rec.concept)
        adapter: tuple[AdapterRecord, Path] | None = None
        if rec.status == PUBLISHED:
            adapter = (published[rec.concept], source.adapter_file(rec.concept))
        elif rec.status == RELEASED and (have is None or have.status != RELEASED):
            adapter = source.released_adapter_file(rec.concept)
            if adapter is None:
                notes.append(
                    f"slot {rec.slot} ({rec.concept}, released): {source.location} cannot hand "
                    "out its withdrawn adapter, so the slot was not copied and is free in "
                    f"{target.location}"
                )
                continue
        old = tgt_adapters.get(rec.concept)
        copy = (
            adapter is not None
            and (have is None or have.status != RELEASED)
            and (old is None or old.sha256 != adapter[0].sha256)
        )
        if copy:  # checked before the target changes at all for this record
            assert adapter is not None
            _check_sha(adapter[1], adapter[0].sha256, f"adapter of {rec.concept!r}")
        if have is None:
            target.reserve(rec.concept, rec.token, rec.class_word, rec.owner, slot=rec.slot)
            reserved.append(rec.concept)
        elif rec.status == RESERVED and have.status != RESERVED:
            notes.append(f"{rec.concept}: {have.status} in the target, only reserved in the source")
        changed = have is None
        if copy:
            assert adapter is not None
            target.publish(rec.concept, adapter[1], adapter[0].sha256)
            copied.append(rec.concept)
            changed = True
        if rec.status == RELEASED and (have is None or have.status != RELEASED):
            target.release(rec.concept)
            released.append(rec.concept)
            changed = True
        unchanged += not changed
    extra = sorted(set(tgt) - {r.concept for r in src})
    if extra:
        notes.append(f"{len(extra)} concept(s) only in the target were left alone: {extra}")
    return MirrorReport(
        source=source.location,
        target=target.location,
        created=created,
        reserved=tuple(reserved),
        copied=tuple(copied),
        released=tuple(released),
        unchanged=unchanged,
        notes=tuple(notes),
    )


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ValidationFailed(
            f"{what}: the downloaded file has sha256 {got[:12]}…, the record says "
            f"{expected[:12]}…; nothing more was copied",
            hint="run blockctl verify on the source registry",
        )


def _check_same_layout(source: Registry, layout: dict[str, Any], target: Registry) -> None:
    theirs = target.layout()
    for key in ("layout_hash", "basis_sha256"):
        if theirs.get(key) != layout.get(key):
            raise InvalidInput(
                f"{target.location} has a different layout than {source.location} "
                f"({key} {str(theirs.get(key))[:12]} vs {str(layout.get(key))[:12]})",
                hint="mirror into a new location",
            )


def _check_conflicts(src: list[SlotRecord], tgt: dict[str, SlotRecord], where: str) -> None:
    """Refuse before changing anything if the target holds the source's slots or names
    differently (names compared as the registries compare them, by ``fold``)."""
    by_slot = {r.slot: r for r in tgt.values()}
    by_name = {fold(r.concept): r for r in tgt.values()}
    by_token = {fold(r.token): r for r in tgt.values()}
    problems = []
    for rec in src:
        have = tgt.get(rec.concept)
        if have is None:
            other = (
                by_slot.get(rec.slot)
                or by_name.get(fold(rec.concept))
                or by_token.get(fold(rec.token))
            )
            if other is not None:
                problems.append(
                    f"slot {other.slot} holds {other.concept!r} (token {other.token!r}), which "
                    f"clashes with {rec.concept!r} (slot {rec.slot}, token {rec.token!r})"
                )
        elif (have.slot, have.token) != (rec.slot, rec.token):
            problems.append(
                f"{rec.concept!r} is slot {have.slot} token {have.token!r} there, "
                f"slot {rec.slot} token {rec.token!r} here"
            )
        elif have.status == RELEASED and rec.status != RELEASED:
            problems.append(f"{rec.concept!r} is released there but {rec.status} here")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SlotConflict(
            f"cannot mirror into {where}: {'; '.join(problems[:3])}{more}",
            hint="mirror into a new location",
        )
