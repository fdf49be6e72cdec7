"""The registry contract, run on both backends (SQLite, and the Hub over HTTP against the test
Hub): the same calls give the same records, the same refusals and the same messages, so any
difference between the backends is a failing test."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from registry import LocalRegistry, Registry
from registry.base import PUBLISHED, RELEASED, RESERVED, fold
from tests.support.hub_fixtures import HubServer, hub_registry

LAYOUT: dict[str, Any] = {"slots": 16, "rank": 4, "targets": ["down.0.attn2.to_k"], "seed": 0}
BASIS = b"not really safetensors, the backends do not parse it"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[int], Registry]  # a new, empty registry with that many slots
    marker: Callable[[Registry], Any]  # changes whenever the store changes
    stored: Callable[[Registry], set[str]]  # sha256 of every adapter file the store holds


def _local(tmp_path: Path, basis: Path) -> Backend:
    def make(n: int) -> Registry:
        reg = LocalRegistry(tmp_path / f"reg-{uuid.uuid4().hex[:8]}")
        reg.create({**LAYOUT, "slots": n}, basis)
        return reg

    def files(reg: Registry) -> list[Path]:
        root = Path(reg.location)
        sidecars = ("-wal", "-shm")  # SQLite's transient files
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(sidecars))

    def marker(reg: Registry) -> Any:
        import sqlite3

        with sqlite3.connect(Path(reg.location) / "registry.db") as conn:
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return events, files(reg)

    def stored(reg: Registry) -> set[str]:
        return {p.name.split(".")[0] for p in files(reg) if p.parent.parent.name == "adapters"}

    return Backend("local", make, marker, stored)


def _hub(tmp_path: Path, basis: Path, server: HubServer) -> Backend:
    def repo(reg: Registry) -> tuple[str, str]:
        return "model", reg.location.removeprefix("hf://")

    def make(n: int) -> Registry:
        name = uuid.uuid4().hex[:8]
        reg: Registry = hub_registry(tmp_path / f"state-{name}", f"hf://acme/reg-{name}")
        reg.create({**LAYOUT, "slots": n}, basis)
        return reg

    def stored(reg: Registry) -> set[str]:
        tree = server.tree(*repo(reg))
        return {sha(data) for path, data in tree.items() if path.startswith("adapters/")}

    return Backend("hub", make, lambda reg: server.head(*repo(reg)), stored)


@pytest.fixture(params=["local", "hub"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    basis = tmp_path / "basis-src.safetensors"
    basis.write_bytes(BASIS)
    if request.param == "local":
        return _local(tmp_path, basis)
    return _hub(tmp_path, basis, request.getfixturevalue("hub"))


@pytest.fixture
def reg(backend: Backend) -> Registry:
    return backend.make(16)


def snapshot(backend: Backend, reg: Registry) -> tuple[Any, ...]:
    """Everything a refused call must leave alone."""
    return reg.slots(), reg.adapters(), backend.marker(reg)


# -- reserve ---------------------------------------------------------------------------------------


def test_reserve_lowest_free_slot(reg: Registry) -> None:
    recs = [reg.reserve(c, f"<{c}>", "thing", "me") for c in ("a", "b", "c")]
    assert [r.slot for r in recs] == [0, 1, 2]
    assert recs[0].status == RESERVED and recs[0].owner == "me" and recs[0].class_word == "thing"
    assert recs[0].published_at is None and recs[0].released_at is None
    assert datetime.fromisoformat(recs[0].reserved_at).utcoffset() == timedelta(0)
    reg.release("b")
    assert reg.reserve("d", "<d>", "thing", "me").slot == 1  # the hole is reused first
    assert reg.reserve("e", "<e>", "thing", "me").slot == 3
    assert [s.concept for s in reg.slots()] == ["a", "d", "c", "e"]
    assert reg.slot_for("d").slot == 1


def test_reserve_explicit_slot(backend: Backend, reg: Registry) -> None:
    assert reg.reserve("rex", "<rex>", "dog", "me", slot=7).slot == 7
    assert reg.reserve("tom", "<tom>", "cat", "me").slot == 0
    assert reg.reserve("last", "<last>", "cat", "me", slot=15).slot == 15
    before = snapshot(backend, reg)
    for bad in (16, -1, 100):
        with pytest.raises(InvalidInput, match=r"out of range.*0\.\.15"):
            reg.reserve("x", "<x>", "cat", "me", slot=bad)
    with pytest.raises(InvalidInput, match="integer"):
        reg.reserve("x", "<x>", "cat", "me", slot=True)
    assert snapshot(backend, reg) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("rex", "<o>", "dog", "b"), "concept 'rex' already holds slot 3 (owner studio-a"),
        (("REX", "<o>", "dog", "b"), "clashes with concept 'rex' in slot 3"),
        (("o", "<rex>", "dog", "b"), "token '<rex>' is already used by concept 'rex' (slot 3)"),
        (("o", "<REX>", "dog", "b"), "token '<REX>' is already used as '<rex>' by concept 'rex'"),
        (("o", "<o>", "dog", "b", 3), "slot 3 is taken by concept 'rex' (owner studio-a)"),
    ],
)
def test_reserve_conflicts_name_the_holder(
    backend: Backend, reg: Registry, args: tuple[Any, ...], message: str
) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a", slot=3)
    before = snapshot(backend, reg)
    with pytest.raises(SlotConflict, match=re.escape(message)) as info:
        reg.reserve(*args)
    assert info.value.exit_code == 3 and info.value.hint
    assert snapshot(backend, reg) == before


@pytest.mark.parametrize(
    ("held", "other"),
    [
        ("<straße>", "<STRASSE>"),  # full case folding: ß is ss
        ("<rex>", "<ＲＥＸ>"),  # fullwidth letters (NFKC)
        ("<\u212a>", "<k>"),  # Kelvin sign
        ("<ﬁx>", "<FIX>"),  # a ligature
        ("<Ω>", "<\u2126>"),  # Ohm sign
    ],
)
def test_tokens_clash_by_the_one_unicode_rule(
    backend: Backend, reg: Registry, held: str, other: str
) -> None:
    # the same by fold, different by ASCII case folding (SQLite's NOCASE, the old rule)
    assert fold(held) == fold(other) and held.encode().lower() != other.encode().lower()
    reg.reserve("a", held, "dog", "me")
    before = snapshot(backend, reg)
    with pytest.raises(SlotConflict, match=f"already used as '{held}'"):
        reg.reserve("b", other, "dog", "me")
    assert snapshot(backend, reg) == before
    assert reg.reserve("c", other + "2", "dog", "me").slot == 1  # only equal names clash


@given(st.text(max_size=12))
def test_fold_is_stable(name: str) -> None:
    """Folding twice changes nothing, and case folding first changes nothing: one rule, well
    defined (e.g. a stored folded key still matches its name's fold)."""
    assert fold(fold(name)) == fold(name) == fold(name.casefold())
    if name.isascii():
        assert fold(name.upper()) == fold(name.lower()) == name.lower()


def test_exhausted(backend: Backend, adapter: tuple[Path, str]) -> None:
    reg = backend.make(3)
    for c in ("a", "b", "c"):
        reg.reserve(c, f"<{c}>", "thing", "me")
    reg.publish("a", *adapter)
    reg.release("a")
    before = snapshot(backend, reg)
    with pytest.raises(SlotConflict, match=r"all 3 slots are taken \(2 reserved, 1 released\)"):
        reg.reserve("d", "<d>", "thing", "me")
    assert snapshot(backend, reg) == before
    reg.release("b")  # never published: its slot returns to the pool
    assert reg.reserve("d", "<d>", "thing", "me").slot == 1


@pytest.mark.parametrize(
    "args",
    [
        ("", "<x>", "dog", "me"),
        ("a b", "<x>", "dog", "me"),
        ("../etc", "<x>", "dog", "me"),
        ("-dash", "<x>", "dog", "me"),
        ("x" * 65, "<x>", "dog", "me"),
        ("ök", "<x>", "dog", "me"),
        ("ok", "", "dog", "me"),
        ("ok", "<a b>", "dog", "me"),
        ("ok", "<x>", "", "me"),
        ("ok", "<x>", "dog", "a/b"),
        ("ok", "<x>", "dog\n", "me"),
    ],
)
def test_bad_names_are_refused_first(
    backend: Backend, reg: Registry, args: tuple[str, ...]
) -> None:
    before = snapshot(backend, reg)
    with pytest.raises(InvalidInput):
        reg.reserve(*args)
    assert snapshot(backend, reg) == before


# -- release ---------------------------------------------------------------------------------------


def test_release_unpublished_returns_slot(reg: Registry) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    rec = reg.release("rex", owner="studio-a")
    assert rec.status == RELEASED and rec.released_at is not None and rec.slot == 0
    assert rec.published_at is None and reg.slots() == []
    assert reg.released_adapter_file("rex") is None
    # slot, name and token are all free again
    assert reg.reserve("rex", "<rex>", "dog", "studio-b").slot == 0


def test_release_published_burns_slot(reg: Registry, adapter: tuple[Path, str]) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    published = reg.publish("rex", *adapter)
    assert reg.released_adapter_file("rex") is None  # not released (yet)
    rec = reg.release("rex")
    assert rec.status == RELEASED and rec.published_at and rec.released_at
    assert reg.slots() == [rec] and reg.adapters() == []
    with pytest.raises(SlotConflict, match="concept 'rex' was released from slot 0; its adapter"):
        reg.adapter_file("rex")
    withdrawn = reg.released_adapter_file("rex")
    assert withdrawn is not None and withdrawn[0].sha256 == published.sha256
    assert withdrawn[1].read_bytes() == adapter[0].read_bytes()
    with pytest.raises(SlotConflict, match="concept 'rex' was released from slot 0"):
        reg.reserve("rex", "<new>", "dog", "me")
    with pytest.raises(SlotConflict, match="token '<rex>' is already used by concept 'rex'"):
        reg.reserve("new", "<rex>", "dog", "me")
    with pytest.raises(SlotConflict, match=r"slot 0 is taken by concept 'rex'.*never reused"):
        reg.reserve("new", "<new>", "dog", "me", slot=0)
    assert reg.reserve("new", "<new>", "dog", "me").slot == 1
    with pytest.raises(SlotConflict, match="already released"):
        reg.release("rex")
    with pytest.raises(SlotConflict, match="cannot be published again"):
        reg.publish("rex", *adapter)


def test_release_refusals(backend: Backend, reg: Registry) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    before = snapshot(backend, reg)
    with pytest.raises(SlotConflict, match="held by owner studio-a, not studio-b"):
        reg.release("rex", owner="studio-b")
    with pytest.raises(SlotConflict, match="concept 'nope' has no reserved slot"):
        reg.release("nope")
    with pytest.raises(InvalidInput):
        reg.release("../x")
    assert snapshot(backend, reg) == before
    with pytest.raises(SlotConflict, match="no reserved slot"):
        reg.slot_for("nope")


# -- publish ---------------------------------------------------------------------------------------


def test_publish_and_republish(reg: Registry, adapter: tuple[Path, str], tmp_path: Path) -> None:
    file, digest = adapter
    reg.reserve("rex", "<rex>", "dog", "studio-a", slot=2)
    rec = reg.publish("rex", file, digest.upper())  # hex case does not matter
    assert (rec.concept, rec.slot, rec.sha256, rec.size) == ("rex", 2, digest, file.stat().st_size)
    assert reg.adapters() == [rec]
    assert reg.adapter_file("rex").read_bytes() == file.read_bytes()
    slot = reg.slot_for("rex")
    assert slot.status == PUBLISHED and slot.published_at == rec.published_at
    v2 = tmp_path / "v2.safetensors"
    v2.write_bytes(b"version two")
    again = reg.publish("rex", v2, sha(b"version two"))
    assert reg.adapters() == [again] and reg.adapter_file("rex").read_bytes() == b"version two"


def test_publish_refusals_change_nothing(
    backend: Backend, reg: Registry, adapter: tuple[Path, str], tmp_path: Path
) -> None:
    file, digest = adapter
    reg.reserve("rex", "<rex>", "dog", "me")
    before = snapshot(backend, reg)
    with pytest.raises(ValidationFailed, match="it was validated with") as info:
        reg.publish("rex", file, sha(b"something else"))
    assert info.value.exit_code == 4
    with pytest.raises(SlotConflict, match="concept 'nope' has no reserved slot"):
        reg.publish("nope", file, digest)
    with pytest.raises(InvalidInput, match="64 hex"):
        reg.publish("rex", file, "abc")
    with pytest.raises(InvalidInput, match="64 hex"):
        reg.publish("rex", file, "../" + digest[3:])
    with pytest.raises(InvalidInput, match="does not exist"):
        reg.publish("rex", tmp_path / "missing", digest)
    assert snapshot(backend, reg) == before
    with pytest.raises(SlotConflict, match="concept 'rex' has no published adapter"):
        reg.adapter_file("rex")


# -- the model-based property test -------------------------------------------------------------

CONCEPTS = ["a", "b", "c", "d", "e", "f"]
N_PROP_SLOTS = 4
op_strategy = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.sampled_from(CONCEPTS),
        st.sampled_from([*CONCEPTS, "A", "Ｂ"]),  # token <x>: may clash, also by folding
        st.one_of(st.none(), st.integers(0, N_PROP_SLOTS - 1)),
    ),
    st.tuples(st.just("release"), st.sampled_from(CONCEPTS)),
    st.tuples(st.just("publish"), st.sampled_from(CONCEPTS), st.integers(0, 1)),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op_strategy, max_size=18))
def test_property_reserve_release_publish(
    backend: Backend, tmp_path: Path, ops: list[tuple[Any, ...]]
) -> None:
    """Random operations agree with a simple model on both backends, and a registry never
    holds two records with the same slot, concept or (folded) token, nor a slot out of range,
    nor an adapter file no record refers to; a refused call changes nothing."""
    blobs = [b"blob zero", b"blob one"]
    files = []
    for data in blobs:
        files.append(tmp_path / f"{uuid.uuid4().hex}.bin")
        files[-1].write_bytes(data)
    reg = backend.make(N_PROP_SLOTS)
    model: dict[str, dict[str, Any]] = {}  # concept -> slot, token, status, sha
    for op in ops:
        before = snapshot(backend, reg)
        refused = True
        if op[0] == "reserve":
            _, concept, tok, slot = op
            token = f"<{tok}>"
            used = {m["slot"] for m in model.values()}
            free = [s for s in range(N_PROP_SLOTS) if s not in used]
            clash = (
                concept in model
                or any(fold(m["token"]) == fold(token) for m in model.values())
                or (slot is not None and slot in used)
                or not free
            )
            if clash:
                with pytest.raises(SlotConflict):
                    reg.reserve(concept, token, "thing", "me", slot=slot)
            else:
                rec = reg.reserve(concept, token, "thing", "me", slot=slot)
                refused = False
                assert rec.slot == (free[0] if slot is None else slot)
                model[concept] = {"slot": rec.slot, "token": token, "status": RESERVED}
        elif op[0] == "release":
            concept = op[1]
            if concept not in model or model[concept]["status"] == RELEASED:
                with pytest.raises(SlotConflict):
                    reg.release(concept)
            else:
                reg.release(concept)
                refused = False
                if model[concept]["status"] == RESERVED:
                    del model[concept]
                else:
                    model[concept]["status"] = RELEASED
        else:
            _, concept, which = op
            if concept not in model or model[concept]["status"] == RELEASED:
                with pytest.raises(SlotConflict):
                    reg.publish(concept, files[which], sha(blobs[which]))
            else:
                reg.publish(concept, files[which], sha(blobs[which]))
                refused = False
                model[concept]["status"] = PUBLISHED
                model[concept]["sha"] = sha(blobs[which])
        if refused:
            assert snapshot(backend, reg) == before
        recs = reg.slots()
        assert len({r.slot for r in recs}) == len(recs)
        assert len({fold(r.concept) for r in recs}) == len(recs)
        assert len({fold(r.token) for r in recs}) == len(recs)
        assert all(0 <= r.slot < N_PROP_SLOTS for r in recs)
        assert {r.concept: (r.slot, r.token, r.status) for r in recs} == {
            c: (m["slot"], m["token"], m["status"]) for c, m in model.items()
        }
        assert backend.stored(reg) == {m["sha"] for m in model.values() if "sha" in m}
