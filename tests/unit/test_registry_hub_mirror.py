"""mirror: a Hub registry (over HTTP) into a local one and back, every record and adapter
reproduced (released slots too, in both directions), sha256 checked, idempotent, and refusals
before anything changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import layout_of, sha256_file
from blockctl.mirror import mirror
from blockctl.verify import verify_registry
from registry import LocalRegistry, Registry
from registry.hub import HubRegistry
from tests.conftest import AdapterFactory
from tests.support.hub_fixtures import REPO, HubServer, hub_registry, tiny_layout


@pytest.fixture
def source(
    hub: HubServer,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    adapter_factory: AdapterFactory,
) -> HubRegistry:
    """rex published (slot 0), bolt published then released (slot 1, burnt), tabby reserved
    at slot 3 by another owner."""
    reg: HubRegistry = hub_registry(tmp_path / "state")
    reg.create(*layout)
    for concept in ("rex", "bolt"):
        path = adapter_factory(reg, concept, seed=len(concept))
        reg.publish(concept, path, sha256_file(path))
    reg.release("bolt")
    reg.reserve("tabby", "<tabby>", "cat", "studio-b", slot=3)
    return reg


def state(reg: Registry) -> tuple[list[tuple[Any, ...]], list[tuple[str, int, str]]]:
    slots = [(r.slot, r.concept, r.token, r.class_word, r.owner, r.status) for r in reg.slots()]
    return slots, [(a.concept, a.slot, a.sha256) for a in reg.adapters()]


def withdrawn_sha(reg: Registry, concept: str) -> str | None:
    got = reg.released_adapter_file(concept)
    return None if got is None else sha256_file(got[1])


def test_hub_to_local_and_back(source: HubRegistry, hub: HubServer, tmp_path: Path) -> None:
    local = LocalRegistry(tmp_path / "reg")
    report = mirror(source, local)
    assert report.created and report.reserved == ("rex", "bolt", "tabby")
    assert report.copied == ("rex", "bolt") and report.released == ("bolt",) and not report.notes
    assert state(local) == state(source)
    assert withdrawn_sha(local, "bolt") == withdrawn_sha(source, "bolt") is not None
    assert local.reserve("new", "<new>", "dog", "me").slot == 2  # slot 1 stayed burnt
    local.release("new")
    assert verify_registry(local, layout_of(local)).ok
    assert local.adapter_file("rex").read_bytes() == source.adapter_file("rex").read_bytes()

    again = mirror(source, local)
    assert (again.reserved, again.copied, again.released, again.unchanged) == ((), (), (), 3)

    # --push: the local copy into a new Hub repo (created on the way), released slot included
    back = hub_registry(tmp_path / "state2", "hf://datasets/acme/copy")
    pushed = mirror(local, back)
    assert pushed.created and not pushed.notes and pushed.released == ("bolt",)
    assert state(back) == state(source)
    assert withdrawn_sha(back, "bolt") == withdrawn_sha(source, "bolt")
    assert "adapters/bolt.safetensors" in hub.tree("dataset", "acme/copy")
    assert verify_registry(back, layout_of(back)).ok


def test_a_local_release_is_pushed_as_released(
    hub: HubServer,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    adapter_factory: AdapterFactory,
) -> None:
    local = LocalRegistry(tmp_path / "reg")
    local.create(*layout)
    path = adapter_factory(local, "rex")
    local.publish("rex", path, sha256_file(path))
    local.release("rex")
    target = hub_registry(tmp_path / "state")
    report = mirror(local, target)
    assert report.released == ("rex",) and not report.notes
    assert [(r.slot, r.concept, r.status) for r in target.slots()] == [(0, "rex", "released")]
    with pytest.raises(SlotConflict, match="never reused"):
        target.reserve("bolt", "<bolt>", "dog", "me", slot=0)


def test_hub_to_hub(source: HubRegistry, tmp_path: Path) -> None:
    copy = hub_registry(tmp_path / "state2", "hf://acme/copy")
    mirror(source, copy)
    assert state(copy) == state(source)


def test_updates_are_copied(
    source: HubRegistry, tmp_path: Path, adapter_factory: AdapterFactory
) -> None:
    local = LocalRegistry(tmp_path / "reg")
    mirror(source, local)
    path = adapter_factory(source, "tabby", seed=7)
    source.publish("tabby", path, sha256_file(path))
    source.release("rex")
    report = mirror(source, local)
    assert report.copied == ("tabby",) and report.released == ("rex",)
    assert state(local) == state(source)


def test_a_damaged_adapter_stops_the_mirror(
    source: HubRegistry, hub: HubServer, tmp_path: Path
) -> None:
    hub.commit_files(*REPO, {"adapters/rex.safetensors": b"not the published bytes"})
    local = LocalRegistry(tmp_path / "reg")
    with pytest.raises(ValidationFailed, match=r"adapter of 'rex'.*sha256"):
        mirror(hub_registry(tmp_path / "fresh"), local)
    assert local.slots() == []  # refused before rex was even reserved


@pytest.mark.parametrize(
    ("held", "match"),
    [
        (("other", "<other>", 0), r"slot 0 holds 'other'.*clashes with 'rex'"),
        (("TABBY", "<x>", 2), r"'TABBY'.*clashes with 'tabby'"),  # names compare by fold
        (("ok", "<ＴＡＢＢＹ>", 2), r"token '<ＴＡＢＢＹ>'.*clashes with 'tabby'"),
    ],
)
def test_clashing_targets_are_refused_before_any_change(
    source: HubRegistry,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    held: tuple[str, str, int],
    match: str,
) -> None:
    local = LocalRegistry(tmp_path / "reg")
    local.create(*layout)
    concept, token, slot = held
    local.reserve(concept, token, "dog", "me", slot=slot)
    with pytest.raises(SlotConflict, match=match):
        mirror(source, local)
    assert [r.concept for r in local.slots()] == [concept]


def test_other_refusals(source: HubRegistry, tmp_path: Path) -> None:
    different, basis = tiny_layout(tmp_path, slots=2)
    elsewhere = LocalRegistry(tmp_path / "reg2")
    elsewhere.create(different, basis)
    with pytest.raises(InvalidInput, match="different layout"):
        mirror(source, elsewhere)
    with pytest.raises(InvalidInput, match="onto itself"):
        mirror(source, source)
