"""Atomic changes on the Hub: parent_commit, 412 on a moved branch, re-planning on fresh
state, the retry bound, and nothing half-written."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from blockctl.errors import RegistryUnavailable
from blockctl.layout import sha256_file
from registry.base import SlotRecord
from registry.hub import HubRegistry
from tests.conftest import AdapterFactory
from tests.hub_standin import FakeHub, hub_registry, tiny_layout

REPO = ("model", "acme/blocks")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return tiny_layout(tmp_path_factory.mktemp("layout"), slots=8, rank=1)


def slot_files(hub: FakeHub) -> dict[int, dict[str, Any]]:
    tree = hub.tree(*REPO)
    return {int(p[6:9]): json.loads(tree[p]) for p in tree if p.startswith("slots/")}


def test_eight_threads_reserve_eight_distinct_slots(
    reg: HubRegistry, hub: FakeHub, tmp_path: Path
) -> None:
    hub.latency_s = 0.002  # a network round trip, so the threads' reads and commits interleave
    start = threading.Barrier(8)
    got: dict[int, SlotRecord] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        mine = hub_registry(hub, tmp_path / f"state-{i}")
        start.wait()
        try:
            got[i] = mine.reserve(f"c{i}", f"<c{i}>", "dog", f"owner{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.slot for r in got.values()) == list(range(8))
    files = slot_files(hub)
    assert {s: f["concept"] for s, f in files.items()} == {r.slot: r.concept for r in got.values()}
    # a linear history: one commit per reservation, each on its parent
    history = hub.history(*REPO)
    assert [c.message.split()[1] for c in history[:8]] == ["reserve"] * 8
    assert hub.commit_attempts > 8  # the threads really did collide, and retried
    assert reg.slots() == sorted(got.values(), key=lambda r: r.slot)


def test_a_reservation_racing_a_publish(
    reg: HubRegistry, hub: FakeHub, tmp_path: Path, adapter_factory: AdapterFactory
) -> None:
    path = adapter_factory(reg, "rex")  # rex holds slot 0
    other = hub_registry(hub, tmp_path / "other")
    # rex's publish lands between the other client's read and its commit
    hub.before_next_commit(lambda: reg.publish("rex", path, sha256_file(path)))
    tabby = other.reserve("tabby", "<tabby>", "cat", "b")
    assert tabby.slot == 1
    files = slot_files(hub)
    assert files[0]["status"] == "published" and files[0]["adapter"]["sha256"] == sha256_file(path)
    assert files[1]["concept"] == "tabby"
    assert [c.message for c in hub.history(*REPO)[:3]] == [
        "blockctl: reserve slot 1 for tabby",
        "blockctl: publish rex in slot 0",
        "blockctl: reserve slot 0 for rex",
    ]
    # and the other way round: a publish beaten by a reservation
    hub.before_next_commit(lambda: other.reserve("bolt", "<bolt>", "dog", "b"))
    rec = reg.publish("rex", path, sha256_file(path))
    assert rec.slot == 0 and {s: f["concept"] for s, f in slot_files(hub).items()} == {
        0: "rex",
        1: "tabby",
        2: "bolt",
    }
    assert [a.concept for a in other.adapters()] == ["rex"]


def test_a_slot_taken_meanwhile_is_never_overwritten(reg: HubRegistry, hub: FakeHub) -> None:
    reg.reserve("rex", "<rex>", "dog", "a")
    # planned on slot 1, but a foreign client writes slots/001.json first
    hub.before_next_commit(
        lambda: hub.commit_files(
            *REPO,
            {
                "slots/001.json": json.dumps(
                    {
                        "slot": 1,
                        "concept": "bolt",
                        "token": "<bolt>",
                        "class_word": "dog",
                        "owner": "x",
                        "status": "reserved",
                        "reserved_at": "2025-01-01T00:00:00.000+00:00",
                        "published_at": None,
                        "released_at": None,
                        "adapter": None,
                    }
                ).encode()
            },
        )
    )
    assert reg.reserve("tabby", "<tabby>", "cat", "a").slot == 2
    assert slot_files(hub)[1]["concept"] == "bolt"


def test_a_412_storm_gives_up_cleanly(reg: HubRegistry, hub: FakeHub) -> None:
    before = hub.tree(*REPO)
    attempts = hub.commit_attempts
    hub.storm(8, *REPO)
    with pytest.raises(RegistryUnavailable) as info:
        reg.reserve("rex", "<rex>", "dog", "a")
    assert info.value.exit_code == 5
    assert "registry busy: gave up after 8 conflicting commits" in info.value.message
    assert hub.commit_attempts - attempts == 8
    after = hub.tree(*REPO)
    assert {p for p in after if not p.startswith("noise/")} == set(before)  # nothing of ours
    assert reg.slots() == []


def test_conflicts_within_the_bound_are_retried(
    reg: HubRegistry, hub: FakeHub, adapter_factory: AdapterFactory
) -> None:
    hub.storm(7, *REPO)
    assert reg.reserve("rex", "<rex>", "dog", "a").slot == 0
    path = adapter_factory(reg, "rex")
    hub.storm(3, *REPO)
    reg.publish("rex", path, sha256_file(path))
    hub.storm(3, *REPO)
    reg.release("rex")
    ours = [c.message for c in hub.history(*REPO) if c.message.startswith("blockctl")]
    assert ours[:3] == [
        "blockctl: release slot 0 (rex)",
        "blockctl: publish rex in slot 0",
        "blockctl: reserve slot 0 for rex",
    ]
    # the name check ran on fresh state every time: a concurrent claim of the name wins
    hub.before_next_commit(
        lambda: hub_registry(hub, reg._state_file.parent / "x").reserve("tabby", "<t2>", "cat", "b")
    )
    with pytest.raises(Exception, match="already holds slot"):
        reg.reserve("tabby", "<tabby>", "cat", "a")
