"""Atomic changes on the Hub, over HTTP: parent_commit, 412 on a moved branch, re-planning on
fresh state, the retry bound, nothing half-written, and 8 processes racing ``reserve-slot``."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blockctl.errors import RegistryUnavailable, SlotConflict
from blockctl.layout import sha256_file
from registry.hub import HubRegistry
from tests.conftest import AdapterFactory
from tests.support.hub_fixtures import REPO, URL, HubServer, hub_registry, tiny_layout
from tests.support.processes import run_together

T = TypeVar("T")
PREUPLOAD = r"^POST /api/models/acme/blocks/preupload/main"
HOLD_S = 1.5  # how long the server holds back the paused request


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return tiny_layout(tmp_path_factory.mktemp("layout"), slots=8, rank=1)


def slot_files(hub: HubServer) -> dict[int, dict[str, Any]]:
    tree = hub.tree(*REPO)
    return {int(p[6:9]): json.loads(tree[p]) for p in tree if p.startswith("slots/")}


def commit_posts(hub: HubServer) -> int:
    return sum(r.startswith("POST /api/models/acme/blocks/commit/") for r in hub.requests())


def race(hub: HubServer, first: Callable[[], T], meanwhile: Callable[[], Any]) -> T:
    """Run ``first`` with its first preupload (the start of its commit, after it read the
    registry) held back at the server until ``meanwhile`` has run: ``meanwhile`` lands between
    ``first``'s read and its commit, as a concurrent client's change would."""
    hub.delay(HOLD_S, match=PREUPLOAD, times=1)
    seen = len(hub.requests())
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = first()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(re.search(PREUPLOAD, r) for r in hub.requests()[seen:]):
        assert time.monotonic() < deadline and thread.is_alive(), out
        time.sleep(0.01)
    meanwhile()
    thread.join(60)
    if "error" in out:
        raise out["error"]
    result: T = out["value"]
    return result


WORKER = r"""
import json, sys
how, url, concept = sys.argv[1:4]
if how == "cli":
    from blockctl.cli import main
else:
    from registry import open_registry
wait_for_go()  # imports done
if how == "cli":
    sys.argv = ["blockctl", "--registry", url, "reserve-slot", concept, "--class-word", "dog",
                "--owner", "owner-" + concept, "--json"]
    main()
else:  # what ``reserve-slot`` calls, without the CLI's start-up (torch: ~3 s a process)
    rec = open_registry(url).reserve(concept, "<" + concept + ">", "dog", "owner-" + concept)
    print(json.dumps(rec.to_dict()))
"""


@pytest.mark.parametrize("how", ["library", pytest.param("cli", marks=pytest.mark.slow)])
def test_eight_processes_reserve_eight_distinct_slots(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, how: str
) -> None:
    """8 processes reserve at once, with the default retry settings, over real HTTP."""
    argvs = [[how, URL, f"c{i}"] for i in range(8)]
    outs = run_together(WORKER, argvs, tmp_path / "race")
    assert [code for code, _, _ in outs] == [0] * 8, [err for _, _, err in outs]
    got = {json.loads(out)["concept"]: json.loads(out)["slot"] for _, out, _ in outs}
    assert sorted(got.values()) == list(range(8))
    assert {s: f["concept"] for s, f in slot_files(hub).items()} == {s: c for c, s in got.items()}
    history = hub.history(*REPO)  # linear: one commit per reservation, each on its parent
    assert [c.title.split()[1] for c in history[:8]] == ["reserve"] * 8
    assert all(c.parent == p.sha for c, p in itertools.pairwise(history))
    assert {r.concept: r.slot for r in reg.slots()} == got
    print(f"commits attempted by 8 racing processes: {commit_posts(hub) - 1}")


def test_a_reservation_racing_a_publish(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, adapter_factory: AdapterFactory
) -> None:
    path = adapter_factory(reg, "rex")  # rex holds slot 0
    other = hub_registry(tmp_path / "other")
    posts = commit_posts(hub)
    tabby = race(
        hub,
        lambda: other.reserve("tabby", "<tabby>", "cat", "b"),
        lambda: reg.publish("rex", path, sha256_file(path)),
    )
    assert tabby.slot == 1
    assert commit_posts(hub) - posts == 3  # the publish, tabby's 412, tabby again
    files = slot_files(hub)
    assert files[0]["status"] == "published" and files[0]["adapter"]["sha256"] == sha256_file(path)
    assert files[1]["concept"] == "tabby"
    assert [c.title for c in hub.history(*REPO)[:3]] == [
        "blockctl: reserve slot 1 for tabby",
        "blockctl: publish rex in slot 0",
        "blockctl: reserve slot 0 for rex",
    ]
    # and the other way round: a publish beaten by a reservation
    rec = race(
        hub,
        lambda: reg.publish("rex", path, sha256_file(path)),
        lambda: other.reserve("bolt", "<bolt>", "dog", "b"),
    )
    assert rec.slot == 0
    assert {s: f["concept"] for s, f in slot_files(hub).items()} == {
        0: "rex",
        1: "tabby",
        2: "bolt",
    }
    assert [a.concept for a in other.adapters()] == ["rex"]


def test_a_slot_taken_meanwhile_is_never_overwritten(reg: HubRegistry, hub: HubServer) -> None:
    reg.reserve("rex", "<rex>", "dog", "a")
    foreign = {
        "slot": 1, "concept": "bolt", "token": "<bolt>", "class_word": "dog", "owner": "x",
        "status": "reserved", "reserved_at": "2025-01-01T00:00:00.000+00:00",
        "published_at": None, "released_at": None, "adapter": None,
    }  # fmt: skip
    # planned on slot 1, but someone writes slots/001.json first
    got = race(
        hub,
        lambda: reg.reserve("tabby", "<tabby>", "cat", "a"),
        lambda: hub.commit_files(*REPO, {"slots/001.json": json.dumps(foreign).encode()}),
    )
    assert got.slot == 2 and slot_files(hub)[1]["concept"] == "bolt"


def test_the_name_check_runs_on_fresh_state(
    reg: HubRegistry, hub: HubServer, tmp_path: Path
) -> None:
    other = hub_registry(tmp_path / "other")
    with pytest.raises(SlotConflict, match="already holds slot 0"):
        race(
            hub,
            lambda: reg.reserve("tabby", "<tabby>", "cat", "a"),
            lambda: other.reserve("tabby", "<t2>", "cat", "b"),
        )


def test_a_412_storm_gives_up_cleanly(reg: HubRegistry, hub: HubServer) -> None:
    before = hub.tree(*REPO)
    posts = commit_posts(hub)
    tries = reg.options.max_tries
    hub.storm(tries)  # a foreign commit lands before each of ours
    with pytest.raises(RegistryUnavailable) as info:
        reg.reserve("rex", "<rex>", "dog", "a")
    assert info.value.exit_code == 5
    assert f"registry busy: gave up after {tries} conflicting commits" in info.value.message
    assert commit_posts(hub) - posts == tries
    after = hub.tree(*REPO)
    assert {p for p in after if not p.startswith("noise/")} == set(before)  # nothing of ours
    assert len(after) - len(before) == tries and reg.slots() == []


def test_conflicts_within_the_bound_are_retried(
    reg: HubRegistry, hub: HubServer, adapter_factory: AdapterFactory
) -> None:
    hub.storm(reg.options.max_tries - 1)
    assert reg.reserve("rex", "<rex>", "dog", "a").slot == 0
    path = adapter_factory(reg, "rex")
    hub.storm(3)
    reg.publish("rex", path, sha256_file(path))
    hub.storm(3)
    reg.release("rex")
    ours = [c.title for c in hub.history(*REPO) if c.title.startswith("blockctl")]
    assert ours[:3] == [
        "blockctl: release slot 0 (rex)",
        "blockctl: publish rex in slot 0",
        "blockctl: reserve slot 0 for rex",
    ]
