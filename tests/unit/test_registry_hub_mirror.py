"""mirror: a Hub registry into a local one and back, every record and adapter reproduced,
sha256 checked, idempotent, and refusals before anything changes."""

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
from tests.hub_standin import FakeHub, hub_registry, tiny_layout

REPO = ("model", "acme/blocks")


@pytest.fixture
def source(
    hub: FakeHub,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    adapter_factory: AdapterFactory,
) -> HubRegistry:
    """rex published (slot 0), bolt published then released (slot 1, burnt), tabby reserved
    at slot 3 by another owner."""
    reg = hub_registry(hub, tmp_path / "state")
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


def test_hub_to_local_and_back(source: HubRegistry, hub: FakeHub, tmp_path: Path) -> None:
    local = LocalRegistry(tmp_path / "reg")
    report = mirror(source, local)
    assert report.created and report.reserved == ("rex", "bolt", "tabby")
    assert report.copied == ("rex", "bolt") and report.released == ("bolt",) and not report.notes
    assert state(local) == state(source)
    assert local.reserve("new", "<new>", "dog", "me").slot == 2  # slot 1 stayed burnt
    local.release("new")
    assert verify_registry(local, layout_of(local)).ok
    assert local.adapter_file("rex").read_bytes() == source.adapter_file("rex").read_bytes()

    again = mirror(source, local)
    assert (again.reserved, again.copied, again.released, again.unchanged) == ((), (), (), 3)

    # --push: the local copy into a new Hub repo (created on the way)
    back = hub_registry(hub, tmp_path / "state2", "hf://datasets/acme/copy")
    pushed = mirror(local, back)
    assert pushed.created and state(back)[1] == state(source)[1]
    # the local backend cannot hand out a withdrawn adapter: bolt's burnt slot is reported
    assert [r.concept for r in back.slots()] == ["rex", "tabby"]
    assert len(pushed.notes) == 1 and "slot 1 (bolt, released)" in pushed.notes[0]
    assert verify_registry(back, layout_of(back)).ok


def test_hub_to_hub_reproduces_released_slots(
    source: HubRegistry, hub: FakeHub, tmp_path: Path
) -> None:
    copy = hub_registry(hub, tmp_path / "state2", "hf://acme/copy")
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
    source: HubRegistry, hub: FakeHub, tmp_path: Path
) -> None:
    hub.commit_files(*REPO, {"adapters/rex.safetensors": b"not the published bytes"})
    local = LocalRegistry(tmp_path / "reg")
    with pytest.raises(ValidationFailed, match=r"adapter of 'rex'.*sha256"):
        mirror(hub_registry(hub, tmp_path / "fresh"), local)
    assert local.slots() == []  # refused before rex was even reserved


def test_refusals_change_nothing(
    source: HubRegistry, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    local = LocalRegistry(tmp_path / "reg")
    local.create(*layout)
    local.reserve("other", "<other>", "dog", "me", slot=0)
    with pytest.raises(SlotConflict, match="slot 0 holds 'other', not 'rex'"):
        mirror(source, local)
    assert [r.concept for r in local.slots()] == ["other"]

    different, basis = tiny_layout(tmp_path, slots=2)
    elsewhere = LocalRegistry(tmp_path / "reg2")
    elsewhere.create(different, basis)
    with pytest.raises(InvalidInput, match="different layout"):
        mirror(source, elsewhere)
    with pytest.raises(InvalidInput, match="onto itself"):
        mirror(source, source)
