"""The local registry backend: SQLite + blob folder, uniqueness, atomicity, migrations."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from blockctl.errors import InvalidInput, RegistryUnavailable, SlotConflict
from registry import LocalRegistry, Registry, open_registry
from registry import migrations as mig
from registry.base import PUBLISHED
from tests.support.processes import run_together

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


@pytest.mark.parametrize(
    "args", [("../etc", "<x>", "dog", "me"), ("ok", "<a b>", "dog", "me"), ("ok", "<x>", "", "me")]
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


def test_old_registry_upgrades_to_folded_name_keys(
    tmp_path: Path, basis: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry made before m002 (ASCII-only NOCASE uniqueness) is upgraded in place on
    open: keys filled in, names the new rule calls equal kept (never dropped) but blocking."""
    monkeypatch.setattr(mig, "MIGRATIONS", mig.MIGRATIONS[:1])  # the old schema
    make_registry(tmp_path / "old", basis).close()
    monkeypatch.undo()
    with sqlite3.connect(tmp_path / "old" / "registry.db") as conn:  # rows as blockctl wrote them
        conn.executemany(
            "INSERT INTO slots (slot, concept, token, class_word, owner, status, reserved_at) "
            "VALUES (?, ?, ?, 'dog', 'a', 'reserved', '2025-01-01T00:00:00.000+00:00')",
            # NOCASE folds ASCII only, so all three were allowed then
            [(0, "rex", "<straße>"), (1, "tom", "<STRASSE>"), (2, "kel", "<ＲＥＸ>")],
        )

    reg = LocalRegistry(tmp_path / "old")
    assert [(r.concept, r.token) for r in reg.slots()] == [
        ("rex", "<straße>"),
        ("tom", "<STRASSE>"),
        ("kel", "<ＲＥＸ>"),
    ]
    with sqlite3.connect(reg.db_path) as conn:
        keys = conn.execute("SELECT concept_key, token_key FROM slots ORDER BY slot").fetchall()
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(slots)")}
        version = conn.execute("SELECT schema_version FROM layout").fetchone()[0]
    assert keys == [("rex", "<strasse>"), ("tom", "<strasse>/1"), ("kel", "<rex>")]
    assert {"slots_concept_key", "slots_token_key"} <= indexes
    assert not {"slots_concept_nocase", "slots_token_nocase"} & indexes
    assert version == mig.SCHEMA_VERSION == 2
    with pytest.raises(SlotConflict, match="already used as '<straße>'"):
        reg.reserve("new", "<Strasse>", "dog", "me")
    with pytest.raises(SlotConflict, match="already used as '<ＲＥＸ>'"):
        reg.reserve("new", "<rex>", "dog", "me")
    assert reg.reserve("new", "<new>", "dog", "me").slot == 3
    reg.close()
    with sqlite3.connect(reg.db_path) as conn, pytest.raises(sqlite3.IntegrityError, match="key"):
        conn.execute(  # the database itself refuses a row without its keys
            "INSERT INTO slots (slot, concept, token, class_word, owner, status, reserved_at) "
            "VALUES (9, 'x', '<x>', 'c', 'o', 'reserved', 't')"
        )


def test_released_adapter_stays_readable(reg: LocalRegistry, adapter: tuple[Path, str]) -> None:
    reg.reserve("rex", "<rex>", "dog", "me")
    reg.publish("rex", *adapter)
    reg.release("rex")
    got = reg.released_adapter_file("rex")
    assert got is not None and got[1].read_bytes() == adapter[0].read_bytes()
    got[1].unlink()
    with pytest.raises(RegistryUnavailable, match="missing"):
        reg.released_adapter_file("rex")


# -- concurrency -----------------------------------------------------------------------------------

WORKER = r"""
import json, sys
root, concept = sys.argv[1:3]
from registry.local import LocalRegistry
wait_for_go()
rec = LocalRegistry(root).reserve(concept, "<" + concept + ">", "thing", "owner-" + concept)
print(json.dumps(rec.to_dict()))
"""


def test_sixteen_processes_get_sixteen_distinct_slots(tmp_path: Path, basis: Path) -> None:
    reg = make_registry(tmp_path / "reg", basis, slots=16)
    reg.close()
    concepts = [f"c{i:02d}" for i in range(16)]
    outs = run_together(WORKER, [[str(reg.root), c] for c in concepts], tmp_path / "race")
    assert [code for code, _, _ in outs] == [0] * 16, [err for _, _, err in outs]
    got = {json.loads(out)["concept"]: json.loads(out)["slot"] for _, out, _ in outs}
    assert sorted(got.values()) == list(range(16))
    final = LocalRegistry(reg.root)
    assert {s.concept: s.slot for s in final.slots()} == got
    assert n_events(final) == 1 + 16  # create + one reserve each
    with pytest.raises(SlotConflict, match="all 16 slots are taken"):
        final.reserve("late", "<late>", "thing", "me")
    final.close()
