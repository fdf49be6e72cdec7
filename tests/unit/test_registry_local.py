"""The local registry backend: SQLite + blob folder, uniqueness, atomicity, migrations."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockctl.errors import InvalidInput, RegistryUnavailable, SlotConflict, ValidationFailed
from registry import LocalRegistry, Registry, open_registry
from registry import migrations as mig
from registry.base import PUBLISHED, RELEASED, RESERVED

REPO = Path(__file__).resolve().parents[2]
LAYOUT: dict[str, Any] = {"slots": 16, "rank": 4, "targets": ["down.0.attn2.to_k"], "seed": 0}
BASIS = b"not really safetensors, the backend does not parse it"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    """Every file below root except SQLite's transient sidecars."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    )


def make_registry(root: Path, basis: Path, **layout: Any) -> LocalRegistry:
    reg = LocalRegistry(root)
    reg.create({**LAYOUT, **layout}, basis)
    return reg


def n_events(reg: LocalRegistry) -> int:
    with sqlite3.connect(reg.db_path) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def state(reg: LocalRegistry) -> tuple[Any, ...]:
    """Everything a failed call must leave alone."""
    return reg.slots(), reg.adapters(), n_events(reg), files_under(reg.root)


@pytest.fixture
def basis(tmp_path: Path) -> Path:
    path = tmp_path / "basis-src.safetensors"
    path.write_bytes(BASIS)
    return path


@pytest.fixture
def reg(tmp_path: Path, basis: Path) -> Iterator[LocalRegistry]:
    r = make_registry(tmp_path / "reg", basis)
    yield r
    r.close()


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "adapter.safetensors"
    data = b"adapter bytes " * 100
    path.write_bytes(data)
    return path, sha(data)


# -- opening and creating ------------------------------------------------------------------------


def test_open_registry_dispatch_creates_nothing(tmp_path: Path) -> None:
    from registry.hub import HubRegistry

    assert isinstance(open_registry("hf://org/name"), HubRegistry)  # lazy: no network
    with pytest.raises(InvalidInput, match="bad Hub registry location"):
        open_registry("hf://org")
    where = tmp_path / "nowhere" / "reg"
    r = open_registry(str(where))
    assert isinstance(r, LocalRegistry)
    assert isinstance(r, Registry)
    assert r.location == str(where)
    assert not where.exists() and not where.parent.exists()


def test_create_then_open(tmp_path: Path, basis: Path) -> None:
    root = tmp_path / "a" / "b" / "reg"  # parents are made
    reg = make_registry(root, basis)
    assert files_under(root) == ["basis.safetensors", "registry.db"]
    assert (root / "adapters").is_dir()
    assert reg.layout() == LAYOUT
    assert reg.basis_path() == root / "basis.safetensors"
    assert reg.basis_path().read_bytes() == BASIS
    assert reg.slots() == [] and reg.adapters() == []
    # nothing left beside it (the staging folder was renamed into place)
    assert [p.name for p in root.parent.iterdir()] == ["reg"]
    with sqlite3.connect(root / "registry.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # layout() hands out copies
    reg.layout()["slots"] = 1
    assert reg.layout()["slots"] == 16
    reg.close()
    again = open_registry(str(root))
    assert again.layout() == LAYOUT


def test_create_in_empty_folder(tmp_path: Path, basis: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    reg = make_registry(root, basis)
    assert files_under(root) == ["basis.safetensors", "registry.db"]
    assert sorted(p.name for p in root.iterdir()) == [
        "adapters",
        "basis.safetensors",
        "registry.db",
    ]
    assert reg.reserve("rex", "<rex>", "dog", "me").slot == 0


def test_create_refusals(tmp_path: Path, basis: Path, reg: LocalRegistry) -> None:
    before = state(reg)
    with pytest.raises(InvalidInput, match="a registry already exists at"):
        LocalRegistry(reg.root).create(LAYOUT, basis)
    assert state(reg) == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    with pytest.raises(InvalidInput, match="not empty"):
        LocalRegistry(full).create(LAYOUT, basis)
    assert [p.name for p in full.iterdir()] == ["x.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InvalidInput, match="not a folder"):
        LocalRegistry(a_file).create(LAYOUT, basis)
    new = tmp_path / "new"
    for bad in ({"rank": 4}, {"slots": 0}, {"slots": "16"}, {"slots": True}):
        with pytest.raises(InvalidInput, match="slots"):
            LocalRegistry(new).create(bad, basis)
    with pytest.raises(InvalidInput, match="JSON"):
        LocalRegistry(new).create({"slots": 2, "x": object()}, basis)
    with pytest.raises(InvalidInput, match="basis file"):
        LocalRegistry(new).create(LAYOUT, tmp_path / "missing.safetensors")
    assert not new.exists()


@pytest.mark.parametrize("existing_folder", [False, True])
def test_failed_create_leaves_nothing(
    tmp_path: Path, basis: Path, monkeypatch: pytest.MonkeyPatch, existing_folder: bool
) -> None:
    import registry.local

    def boom(db: Any) -> list[str]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry.local, "migrate", boom)
    parent = tmp_path / "parent"
    parent.mkdir()
    root = parent / "reg"
    if existing_folder:
        root.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        LocalRegistry(root).create(LAYOUT, basis)
    if existing_folder:
        assert list(root.iterdir()) == []
    assert [p.name for p in parent.iterdir()] == (["reg"] if existing_folder else [])


def test_reopen_preserves_data(
    tmp_path: Path, reg: LocalRegistry, adapter: tuple[Path, str]
) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    reg.reserve("tom", "<tom>", "cat", "studio-b", slot=5)
    reg.publish("rex", *adapter)
    slots, adapters = reg.slots(), reg.adapters()
    reg.close()
    again = open_registry(str(reg.root))
    assert again.slots() == slots
    assert again.adapters() == adapters
    assert again.adapter_file("rex").read_bytes() == adapter[0].read_bytes()
    assert [s.slot for s in slots] == [0, 5]


# -- reserve ---------------------------------------------------------------------------------------


def test_reserve_lowest_free_slot(reg: LocalRegistry) -> None:
    recs = [reg.reserve(c, f"<{c}>", "thing", "me") for c in ("a", "b", "c")]
    assert [r.slot for r in recs] == [0, 1, 2]
    assert recs[0].status == RESERVED and recs[0].owner == "me" and recs[0].class_word == "thing"
    assert recs[0].published_at is None and recs[0].released_at is None
    reserved_at = datetime.fromisoformat(recs[0].reserved_at)
    assert reserved_at.utcoffset() == timedelta(0)
    reg.release("b")
    assert reg.reserve("d", "<d>", "thing", "me").slot == 1  # the hole is reused first
    assert reg.reserve("e", "<e>", "thing", "me").slot == 3
    assert [s.concept for s in reg.slots()] == ["a", "d", "c", "e"]
    assert reg.slot_for("d").slot == 1


def test_reserve_explicit_slot(reg: LocalRegistry) -> None:
    assert reg.reserve("rex", "<rex>", "dog", "me", slot=7).slot == 7
    assert reg.reserve("tom", "<tom>", "cat", "me").slot == 0
    assert reg.reserve("last", "<last>", "cat", "me", slot=15).slot == 15
    before = state(reg)
    for bad in (16, -1, 100):
        with pytest.raises(InvalidInput, match=r"out of range.*0\.\.15"):
            reg.reserve("x", "<x>", "cat", "me", slot=bad)
    with pytest.raises(InvalidInput, match="integer"):
        reg.reserve("x", "<x>", "cat", "me", slot=True)
    assert state(reg) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("rex", "<other>", "dog", "studio-b"),
            "concept 'rex' already holds slot 3 (owner studio-a",
        ),
        (("REX", "<other>", "dog", "studio-b"), "clashes with concept 'rex' in slot 3"),
        (
            ("other", "<rex>", "dog", "studio-b"),
            "token '<rex>' is already used by concept 'rex' (slot 3)",
        ),
        (
            ("other", "<REX>", "dog", "studio-b"),
            "token '<REX>' is already used as '<rex>' by concept 'rex'",
        ),
        (
            ("other", "<other>", "dog", "studio-b", 3),
            "slot 3 is taken by concept 'rex' (owner studio-a)",
        ),
    ],
)
def test_reserve_conflicts_name_the_holder(
    reg: LocalRegistry, args: tuple[Any, ...], message: str
) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a", slot=3)
    before = state(reg)
    with pytest.raises(SlotConflict, match=re.escape(message)) as info:
        reg.reserve(*args)
    assert info.value.exit_code == 3 and info.value.hint
    assert state(reg) == before


def test_reserve_exhausted(tmp_path: Path, basis: Path, adapter: tuple[Path, str]) -> None:
    reg = make_registry(tmp_path / "small", basis, slots=3)
    for c in ("a", "b", "c"):
        reg.reserve(c, f"<{c}>", "thing", "me")
    reg.publish("a", *adapter)
    reg.release("a")
    before = state(reg)
    with pytest.raises(SlotConflict, match=r"all 3 slots are taken \(2 reserved, 1 released\)"):
        reg.reserve("d", "<d>", "thing", "me")
    assert state(reg) == before
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
        ("ok", "", "dog", "me"),
        ("ok", "<a b>", "dog", "me"),
        ("ok", "<x>", "", "me"),
        ("ok", "<x>", "dog", "a/b"),
        ("ok", "<x>", "dog\n", "me"),
    ],
)
def test_reserve_bad_names_before_touching_the_db(
    tmp_path: Path, args: tuple[str, str, str, str]
) -> None:
    # The location does not even exist: names are checked first, so InvalidInput, not
    # RegistryUnavailable, and nothing is created.
    where = tmp_path / "absent"
    with pytest.raises(InvalidInput):
        LocalRegistry(where).reserve(*args)
    assert not where.exists()


# -- release ---------------------------------------------------------------------------------------


def test_release_unpublished_returns_slot(reg: LocalRegistry) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    rec = reg.release("rex", owner="studio-a")
    assert rec.status == RELEASED and rec.released_at is not None and rec.slot == 0
    assert reg.slots() == []
    # slot, name and token are all free again
    assert reg.reserve("rex", "<rex>", "dog", "studio-b").slot == 0


def test_release_published_burns_slot(reg: LocalRegistry, adapter: tuple[Path, str]) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    reg.publish("rex", *adapter)
    rec = reg.release("rex")
    assert rec.status == RELEASED and rec.published_at and rec.released_at
    assert reg.slots() == [rec]
    assert reg.adapters() == []
    with pytest.raises(SlotConflict, match="released"):
        reg.adapter_file("rex")
    with pytest.raises(SlotConflict, match="concept 'rex' was released from slot 0"):
        reg.reserve("rex", "<new>", "dog", "me")
    with pytest.raises(SlotConflict, match="token '<rex>' is already used by concept 'rex'"):
        reg.reserve("new", "<rex>", "dog", "me")
    with pytest.raises(SlotConflict, match="slot 0 is taken by concept 'rex'"):
        reg.reserve("new", "<new>", "dog", "me", slot=0)
    assert reg.reserve("new", "<new>", "dog", "me").slot == 1
    with pytest.raises(SlotConflict, match="already released"):
        reg.release("rex")
    with pytest.raises(SlotConflict, match="released"):
        reg.publish("rex", *adapter)


def test_release_refusals(reg: LocalRegistry) -> None:
    reg.reserve("rex", "<rex>", "dog", "studio-a")
    before = state(reg)
    with pytest.raises(SlotConflict, match="held by owner studio-a, not studio-b"):
        reg.release("rex", owner="studio-b")
    with pytest.raises(SlotConflict, match="concept 'nope' has no reserved slot"):
        reg.release("nope")
    with pytest.raises(InvalidInput):
        reg.release("../x")
    assert state(reg) == before
    with pytest.raises(SlotConflict, match="no reserved slot"):
        reg.slot_for("nope")


# -- publish ---------------------------------------------------------------------------------------


def test_publish_content_addressed(reg: LocalRegistry, adapter: tuple[Path, str]) -> None:
    file, digest = adapter
    reg.reserve("rex", "<rex>", "dog", "studio-a", slot=2)
    rec = reg.publish("rex", file, digest.upper())  # hex case does not matter
    rel = f"adapters/{digest[:2]}/{digest}.safetensors"
    assert rec.concept == "rex" and rec.slot == 2 and rec.sha256 == digest
    assert rec.size == file.stat().st_size and rec.path == rel
    assert reg.adapter_file("rex") == reg.root / rel
    assert (reg.root / rel).read_bytes() == file.read_bytes()
    assert reg.adapters() == [rec]
    slot = reg.slot_for("rex")
    assert slot.status == PUBLISHED and slot.published_at == rec.published_at
    assert files_under(reg.root) == sorted(["basis.safetensors", "registry.db", rel])


def test_republish_replaces_and_collects_old_blob(
    tmp_path: Path, reg: LocalRegistry, adapter: tuple[Path, str]
) -> None:
    file, digest = adapter
    reg.reserve("rex", "<rex>", "dog", "me")
    reg.reserve("tom", "<tom>", "cat", "me")
    reg.publish("rex", file, digest)
    reg.publish("tom", file, digest)  # same bytes: one shared blob
    v2 = tmp_path / "v2.safetensors"
    v2.write_bytes(b"version two")
    reg.publish("rex", v2, sha(b"version two"))
    assert reg.adapter_file("rex").read_bytes() == b"version two"
    assert reg.adapter_file("tom").read_bytes() == file.read_bytes()  # still referenced
    reg.publish("tom", v2, sha(b"version two"))
    blobs = [f for f in files_under(reg.root) if f.startswith("adapters/")]
    assert blobs == [f"adapters/{sha(b'version two')[:2]}/{sha(b'version two')}.safetensors"]
    assert [a.concept for a in reg.adapters()] == ["rex", "tom"]


def test_publish_refusals_leave_registry_unchanged(
    tmp_path: Path, reg: LocalRegistry, adapter: tuple[Path, str]
) -> None:
    file, digest = adapter
    reg.reserve("rex", "<rex>", "dog", "me")
    before = state(reg)
    with pytest.raises(ValidationFailed, match="has sha256") as info:
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
    assert state(reg) == before
    assert not (reg.root / "adapters").exists() or not any((reg.root / "adapters").iterdir())
    with pytest.raises(SlotConflict, match="concept 'rex' has no published adapter"):
        reg.adapter_file("rex")


def test_adapter_file_missing_blob_is_unavailable(
    reg: LocalRegistry, adapter: tuple[Path, str]
) -> None:
    reg.reserve("rex", "<rex>", "dog", "me")
    reg.publish("rex", *adapter)
    reg.adapter_file("rex").unlink()
    with pytest.raises(RegistryUnavailable, match="missing"):
        reg.adapter_file("rex")


# -- unavailable registries ----------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    where = tmp_path / "nope"
    with pytest.raises(RegistryUnavailable, match="no registry at") as info:
        open_registry(str(where)).slots()
    assert info.value.exit_code == 5 and "init" in (info.value.hint or "")
    assert not where.exists()


def test_not_a_registry(tmp_path: Path) -> None:
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(RegistryUnavailable, match="is not a blockctl registry"):
        LocalRegistry(tmp_path).layout()
    assert not (tmp_path / "registry.db").exists()


def test_garbage_db(reg: LocalRegistry) -> None:
    reg.close()
    reg.db_path.write_bytes(os.urandom(8192))
    with pytest.raises(RegistryUnavailable, match="not a readable SQLite database"):
        LocalRegistry(reg.root).slots()


def test_foreign_sqlite_db(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "registry.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    (tmp_path / "basis.safetensors").write_bytes(BASIS)
    with pytest.raises(RegistryUnavailable, match="not a blockctl registry database"):
        LocalRegistry(tmp_path).slots()


def test_missing_table_is_corrupt(reg: LocalRegistry) -> None:
    reg.close()
    with sqlite3.connect(reg.db_path) as conn:
        conn.execute("DROP TABLE events")
    with pytest.raises(RegistryUnavailable, match="corrupt: missing tables events"):
        LocalRegistry(reg.root).slots()


def test_newer_schema(reg: LocalRegistry) -> None:
    reg.close()
    with sqlite3.connect(reg.db_path) as conn:
        conn.execute(
            "INSERT INTO _blockctl_migrations (name, applied_at) VALUES ('m999_future', 'x')"
        )
    with pytest.raises(RegistryUnavailable, match=r"newer blockctl.*m999_future") as info:
        LocalRegistry(reg.root).slots()
    assert "upgrade" in (info.value.hint or "")


def test_missing_basis(reg: LocalRegistry) -> None:
    reg.close()
    (reg.root / "basis.safetensors").unlink()
    with pytest.raises(RegistryUnavailable, match=r"basis\.safetensors is missing"):
        LocalRegistry(reg.root).layout()


# -- migrations ----------------------------------------------------------------------------------


def test_migrations_recorded(reg: LocalRegistry) -> None:
    reg.slots()
    with sqlite3.connect(reg.db_path) as conn:
        rows = conn.execute("SELECT name, applied_at FROM _blockctl_migrations").fetchall()
        version = conn.execute("SELECT schema_version FROM layout").fetchone()[0]
    assert [r[0] for r in rows] == mig.known() and len(rows) == mig.SCHEMA_VERSION >= 1
    for _, applied_at in rows:
        assert datetime.fromisoformat(applied_at).utcoffset() == timedelta(0)
    assert version == mig.SCHEMA_VERSION


def test_pending_migration_applied_once_on_open(
    reg: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.reserve("rex", "<rex>", "dog", "me")
    reg.close()
    calls: list[int] = []

    def m900_add_note(db: Any) -> None:
        calls.append(1)
        db.execute("ALTER TABLE slots ADD COLUMN note TEXT")

    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, m900_add_note])
    assert [s.concept for s in LocalRegistry(reg.root).slots()] == ["rex"]
    assert [s.concept for s in LocalRegistry(reg.root).slots()] == ["rex"]
    assert calls == [1]
    with sqlite3.connect(reg.db_path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _blockctl_migrations")]
        assert conn.execute("SELECT schema_version FROM layout").fetchone()[0] == len(names)
    assert names[-1] == "m900_add_note"


def test_failed_migration_rolls_back(reg: LocalRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    reg.close()

    def m901_broken(db: Any) -> None:
        db.execute("ALTER TABLE slots ADD COLUMN half TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, m901_broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        LocalRegistry(reg.root).slots()
    monkeypatch.undo()
    with sqlite3.connect(reg.db_path) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(slots)")]
        names = [r[0] for r in conn.execute("SELECT name FROM _blockctl_migrations")]
    assert "half" not in cols and names == mig.known()


# -- properties ------------------------------------------------------------------------------------

CONCEPTS = ["a", "b", "c", "d", "e", "f"]
N_PROP_SLOTS = 4
op_strategy = st.one_of(
    st.tuples(
        st.just("reserve"),
        st.sampled_from(CONCEPTS),
        st.sampled_from(CONCEPTS),  # token <x>: may clash with another concept's token
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
def test_property_reserve_release_publish(basis: Path, ops: list[tuple[Any, ...]]) -> None:
    """Random operations agree with a simple model, and the registry never holds two records
    with the same slot, concept or token, nor a slot out of range, nor an orphan blob."""
    blobs = [b"blob zero", b"blob one"]
    with tempfile.TemporaryDirectory() as tmp:
        reg = make_registry(Path(tmp) / "reg", basis, slots=N_PROP_SLOTS)
        files = []
        for i, data in enumerate(blobs):
            files.append(Path(tmp) / f"{i}.bin")
            files[-1].write_bytes(data)
        model: dict[str, dict[str, Any]] = {}  # concept -> slot, token, status
        for op in ops:
            before = state(reg)
            refused = True
            if op[0] == "reserve":
                _, concept, tok, slot = op
                token = f"<{tok}>"
                used = {m["slot"] for m in model.values()}
                free = [s for s in range(N_PROP_SLOTS) if s not in used]
                clash = (
                    concept in model
                    or any(m["token"] == token for m in model.values())
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
                assert state(reg) == before
            recs = reg.slots()
            assert len({r.slot for r in recs}) == len(recs)
            assert len({r.concept for r in recs}) == len(recs)
            assert len({r.token.lower() for r in recs}) == len(recs)
            assert all(0 <= r.slot < N_PROP_SLOTS for r in recs)
            assert {r.concept: (r.slot, r.token, r.status) for r in recs} == {
                c: (m["slot"], m["token"], m["status"]) for c, m in model.items()
            }
            live = {m["sha"] for m in model.values() if "sha" in m}
            stored = {
                f.rsplit("/", 1)[1].split(".")[0]
                for f in files_under(reg.root)
                if f.startswith("adapters/")
            }
            assert stored == live
        reg.close()


# -- concurrency -----------------------------------------------------------------------------------

WORKER = r"""
import json, os, sys, time
root, concept, ready, go = sys.argv[1:5]
from registry.local import LocalRegistry  # imports done before the barrier
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("barrier timeout")
    time.sleep(0.001)
rec = LocalRegistry(root).reserve(concept, "<" + concept + ">", "thing", "owner-" + concept)
print(json.dumps(rec.to_dict()))
"""


def test_sixteen_processes_get_sixteen_distinct_slots(tmp_path: Path, basis: Path) -> None:
    reg = make_registry(tmp_path / "reg", basis, slots=16)
    reg.close()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    concepts = [f"c{i:02d}" for i in range(16)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(reg.root), c, str(barrier / c), str(barrier / "go")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in concepts
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not all((barrier / c).exists() for c in concepts):
            assert time.monotonic() < deadline, "workers did not get ready"
            assert all(p.poll() is None for p in procs), "a worker died before the barrier"
            time.sleep(0.01)
        (barrier / "go").touch()
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 16, [err for _, err in outs]
    got = {json.loads(out)["concept"]: json.loads(out)["slot"] for out, _ in outs}
    assert sorted(got.values()) == list(range(16))
    final = LocalRegistry(reg.root)
    assert {s.concept: s.slot for s in final.slots()} == got
    assert n_events(final) == 1 + 16  # create + one reserve each
    with pytest.raises(SlotConflict, match="all 16 slots are taken"):
        final.reserve("late", "<late>", "thing", "me")
    final.close()
