"""The local registry, the embedded default: SQLite through sqlite-utils, plus a blob folder.

Folder layout::

    <root>/registry.db                               SQLite, WAL journal
    <root>/basis.safetensors                         the layout's orthonormal bases
    <root>/adapters/<sha256[:2]>/<sha256>.safetensors adapter files, content-addressed

Uniqueness of slot, concept and token is enforced by the database (primary key and UNIQUE
indexes, names also by their ``registry.base.fold`` keys), and every change runs in one
``BEGIN IMMEDIATE`` transaction, so concurrent processes can never be handed the same slot.
Every method either does all of its work or leaves the registry as it was.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockctl.atomic import Staged
from blockctl.errors import BlockctlError, InvalidInput, RegistryUnavailable, SlotConflict
from registry.base import (
    PUBLISHED,
    RELEASED,
    RESERVED,
    SLOT_FIELDS,
    AdapterRecord,
    Registry,
    SlotRecord,
    check_new_registry,
    check_publish_input,
    check_publishable,
    check_release,
    check_release_input,
    check_reservation,
    choose_slot,
    fold,
    published_adapter,
    sha_mismatch,
    valid_slot_count,
)
from registry.migrations import (
    MIGRATIONS_TABLE,
    NewerSchemaError,
    current_version,
    has_migrations_table,
    migrate,
    utc_now,
)
from registry.sqlite_db import Database

DB_NAME = "registry.db"
BASIS_NAME = "basis.safetensors"
ADAPTERS_DIR = "adapters"
STAGING_NAME = ".blockctl-creating"
BUSY_TIMEOUT_S = 60.0
TABLES = ("layout", "slots", "adapters", "events")

_CHUNK = 1 << 20
_SLOT_COLS = ", ".join(SLOT_FIELDS)
_ADAPTER_FIELDS = ("concept", "slot", "sha256", "size", "path", "published_at")


def _slot_record(row: Mapping[str, Any]) -> SlotRecord:
    return SlotRecord(**{k: row[k] for k in SLOT_FIELDS})


def _adapter_record(row: Mapping[str, Any]) -> AdapterRecord:
    return AdapterRecord(**{k: row[k] for k in _ADAPTER_FIELDS})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path, *, must_exist: bool) -> Database:
    """A connection in driver autocommit mode (we issue BEGIN IMMEDIATE ourselves)."""
    if must_exist:
        # mode=rw: never create a database file when only opening
        conn = sqlite3.connect(
            path.resolve().as_uri() + "?mode=rw",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
        )
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return Database(conn, execute_plugins=False)
    except BaseException:
        conn.close()
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


class LocalRegistry(Registry):
    """A registry in a local folder. Opening is lazy: nothing is read (or created) until the
    first call; ``create`` is the only method that writes files where there were none."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        self._db: Database | None = None
        self._layout: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"LocalRegistry({self.location!r})"

    def close(self) -> None:
        """Close the database connection (reopened on the next call)."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        self._layout = None

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths -----------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    def _init_hint(self) -> str:
        return f"blockctl --registry {self.location} init ..."

    # -- opening and validation --------------------------------------------------------------
    def _open(self) -> Database:
        if self._db is not None:
            return self._db
        root = self.root
        if not root.exists():
            raise RegistryUnavailable(f"no registry at {root}", hint=self._init_hint())
        if not root.is_dir() or not self.db_path.is_file():
            raise RegistryUnavailable(
                f"{root} is not a blockctl registry (no {DB_NAME})",
                hint=f"create one in a new or empty folder: {self._init_hint()}",
            )
        with self._guard():
            db = _connect(self.db_path, must_exist=True)
        try:
            with self._guard():
                self._layout = self._validate(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _corrupt(self, why: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"the registry database {self.db_path} is corrupt: {why}",
            hint="restore the registry folder from a backup",
        )

    def _newer(self, why: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"the registry at {self.location} was made by a newer blockctl ({why})",
            hint="upgrade blockctl (pip install -U blockctl)",
        )

    def _validate(self, db: Database) -> dict[str, Any]:
        """Integrity, schema version, migrations, tables, layout row, basis file."""
        try:
            result = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            raise RegistryUnavailable(
                f"{self.db_path} is not a readable SQLite database ({exc})",
                hint="restore the registry folder from a backup",
            ) from exc
        if result != ["ok"]:
            raise self._corrupt("; ".join(str(r) for r in result[:3]))
        if not has_migrations_table(db):
            raise RegistryUnavailable(
                f"{self.db_path} is not a blockctl registry database (no {MIGRATIONS_TABLE} table)",
                hint=f"create a registry in a new or empty folder: {self._init_hint()}",
            )
        try:
            migrate(db)
        except NewerSchemaError as exc:
            raise self._newer(f"unknown schema migrations: {exc}") from exc
        missing = [t for t in TABLES if not db[t].exists()]
        if missing:
            raise self._corrupt(f"missing tables {', '.join(missing)}")
        rows = list(db.query("SELECT json, schema_version FROM layout"))
        if len(rows) != 1:
            raise self._corrupt(f"expected one layout row, found {len(rows)}")
        if int(rows[0]["schema_version"] or 0) > current_version():
            raise self._newer(
                f"schema version {rows[0]['schema_version']}, this blockctl knows up to "
                f"{current_version()}"
            )
        try:
            layout = json.loads(rows[0]["json"])
        except (TypeError, ValueError) as exc:
            raise self._corrupt(f"the layout is not valid JSON ({exc})") from exc
        if not isinstance(layout, dict) or not valid_slot_count(layout.get("slots")):
            raise self._corrupt("the layout has no valid 'slots' count")
        if not (self.root / BASIS_NAME).is_file():
            raise RegistryUnavailable(
                f"the registry at {self.location} is incomplete: {BASIS_NAME} is missing",
                hint="restore the registry folder from a backup",
            )
        return layout

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite failures into RegistryUnavailable (one line, for the user)."""
        try:
            yield
        except BlockctlError:
            raise
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise RegistryUnavailable(
                    f"the registry database {self.db_path} stayed locked by another process "
                    f"for {BUSY_TIMEOUT_S:.0f} s",
                    hint="try again when the other blockctl command has finished",
                ) from exc
            raise RegistryUnavailable(
                f"cannot use the registry database {self.db_path}: {text}"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise RegistryUnavailable(
                f"the registry database {self.db_path} failed: {exc}",
                hint="restore the registry folder from a backup",
            ) from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Database]:
        """One write transaction, holding the database write lock from the start."""
        db = self._open()
        conn = db.conn
        with self._guard():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                _rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def _read(self) -> Database:
        return self._open()

    # -- creation and layout -------------------------------------------------------------------
    def create(self, layout: dict[str, Any], basis_file: Path) -> None:
        basis_file = check_new_registry(layout, basis_file)
        layout_json = json.dumps(layout, sort_keys=True)

        root = self.root
        if root.exists():
            if not root.is_dir():
                raise InvalidInput(f"{root} exists and is not a folder")
            if (root / DB_NAME).exists():
                raise InvalidInput(f"a registry already exists at {root}")
            if any(root.iterdir()):
                raise InvalidInput(
                    f"{root} is not empty", hint="create the registry in a new or empty folder"
                )
        self.close()
        if root.exists():
            self._create_in_empty_folder(layout_json, basis_file)
        else:
            self._create_new_folder(layout_json, basis_file)

    def _build(self, where: Path, layout_json: str, basis_file: Path) -> None:
        """Write a complete registry into the (empty) folder ``where``."""
        shutil.copyfile(basis_file, where / BASIS_NAME)
        (where / ADAPTERS_DIR).mkdir()
        db = _connect(where / DB_NAME, must_exist=False)
        try:
            db.enable_wal()
            migrate(db)
            conn = db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = utc_now()
                db.execute(
                    "INSERT INTO layout (id, json, schema_version, created_at) VALUES (1, ?, ?, ?)",
                    [layout_json, current_version(), now],
                )
                db.execute(
                    "INSERT INTO events (time, action, detail) VALUES (?, 'create', ?)",
                    [now, json.dumps({"schema_version": current_version()})],
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        finally:
            db.close()

    def _create_new_folder(self, layout_json: str, basis_file: Path) -> None:
        """Build in a hidden sibling folder, then rename it into place: the registry appears
        complete or not at all."""
        target = self.root.resolve()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.creating-", dir=target.parent))
        except OSError as exc:
            raise InvalidInput(f"cannot create a registry at {self.root}: {exc}") from exc
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            with self._guard():
                self._build(tmp, layout_json, basis_file)
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if target.exists():
                    raise InvalidInput(f"a registry already exists at {self.root}") from exc
                raise InvalidInput(f"cannot create a registry at {self.root}: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _create_in_empty_folder(self, layout_json: str, basis_file: Path) -> None:
        """The folder exists (perhaps a mount point, so it cannot be replaced): build in a
        staging subfolder, then move the pieces up, ``registry.db`` last, since its presence
        is what makes the folder a registry. On failure, remove everything moved."""
        root = self.root
        staging = root / STAGING_NAME
        try:
            staging.mkdir()  # exclusive: a concurrent create fails here
        except FileExistsError as exc:
            raise InvalidInput(f"another process is creating a registry at {root}") from exc
        except OSError as exc:
            raise InvalidInput(f"cannot create a registry at {root}: {exc}") from exc
        moved: list[Path] = []
        try:
            if [p.name for p in root.iterdir()] != [STAGING_NAME]:
                raise InvalidInput(
                    f"{root} is not empty", hint="create the registry in a new or empty folder"
                )
            with self._guard():
                self._build(staging, layout_json, basis_file)
            for name in (BASIS_NAME, ADAPTERS_DIR, DB_NAME):
                os.rename(staging / name, root / name)
                moved.append(root / name)
            staging.rmdir()
        except BaseException as exc:
            for path in reversed(moved):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise InvalidInput(f"cannot create a registry at {root}: {exc}") from exc
            raise

    def layout(self) -> dict[str, Any]:
        self._open()
        assert self._layout is not None
        return copy.deepcopy(self._layout)

    def _n_slots(self) -> int:
        return int(self.layout()["slots"])

    def basis_path(self) -> Path:
        self._open()
        path = self.root / BASIS_NAME
        if not path.is_file():
            raise RegistryUnavailable(
                f"the registry at {self.location} is incomplete: {BASIS_NAME} is missing",
                hint="restore the registry folder from a backup",
            )
        return path

    # -- slots -----------------------------------------------------------------------------------
    def reserve(
        self,
        concept: str,
        token: str,
        class_word: str,
        owner: str,
        slot: int | None = None,
    ) -> SlotRecord:
        check_reservation(concept, token, class_word, owner, slot)
        n = self._n_slots()
        with self._tx() as db:
            chosen = choose_slot(self._records(db), n, concept, token, slot)
            rec = SlotRecord(
                slot=chosen,
                concept=concept,
                token=token,
                class_word=class_word,
                owner=owner,
                status=RESERVED,
                reserved_at=utc_now(),
            )
            try:
                db.execute(
                    "INSERT INTO slots (slot, concept, token, class_word, owner, status, "
                    "reserved_at, concept_key, token_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        chosen,
                        concept,
                        token,
                        class_word,
                        owner,
                        RESERVED,
                        rec.reserved_at,
                        fold(concept),
                        fold(token),
                    ],
                )
            except sqlite3.IntegrityError as exc:
                # choose_slot ran under the write lock, so this is a safety net only.
                raise SlotConflict(
                    f"cannot reserve slot {chosen} for concept {concept!r}: {exc}"
                ) from exc
            self._event(
                db,
                "reserve",
                concept,
                chosen,
                owner,
                {"token": token, "class_word": class_word},
            )
        return rec

    @staticmethod
    def _records(db: Database) -> list[SlotRecord]:
        """Every slot record (at most one per slot, so never many), by slot."""
        rows = db.execute(f"SELECT {_SLOT_COLS} FROM slots ORDER BY slot").fetchall()
        return [SlotRecord(*row) for row in rows]

    @staticmethod
    def _held(db: Database, concept: str) -> SlotRecord | None:
        """The record of exactly ``concept`` (names are looked up as given)."""
        row = db.execute(f"SELECT {_SLOT_COLS} FROM slots WHERE concept = ?", [concept]).fetchone()
        return None if row is None else SlotRecord(*row)

    def _event(
        self,
        db: Database,
        action: str,
        concept: str | None,
        slot: int | None,
        owner: str | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (time, action, concept, slot, owner, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                utc_now(),
                action,
                concept,
                slot,
                owner,
                json.dumps(detail, sort_keys=True) if detail else None,
            ],
        )

    def release(self, concept: str, owner: str | None = None) -> SlotRecord:
        """See ``Registry.release``. For a never-published concept the row is deleted; the
        record returned is the last state, with status ``released`` and ``released_at``."""
        check_release_input(concept, owner)
        with self._tx() as db:
            held = check_release(self._held(db, concept), concept, owner)
            now = utc_now()
            if held.status == RESERVED:
                db.execute("DELETE FROM slots WHERE concept = ?", [concept])
                detail = {"slot_returned": True}
            else:
                db.execute(
                    "UPDATE slots SET status = ?, released_at = ? WHERE concept = ?",
                    [RELEASED, now, concept],
                )
                detail = {"slot_returned": False}
            self._event(db, "release", concept, held.slot, held.owner, detail)
        return replace(held, status=RELEASED, released_at=now)

    def slots(self) -> list[SlotRecord]:
        db = self._read()
        with self._guard():
            return [
                _slot_record(r) for r in db.query(f"SELECT {_SLOT_COLS} FROM slots ORDER BY slot")
            ]

    def slot_for(self, concept: str) -> SlotRecord:
        db = self._read()
        with self._guard():
            held = self._held(db, concept)
        return held if held is not None else super().slot_for(concept)  # raises no_slot

    # -- adapters -----------------------------------------------------------------------------
    def _blob_relpath(self, sha256: str) -> str:
        return f"{ADAPTERS_DIR}/{sha256[:2]}/{sha256}.safetensors"

    def publish(self, concept: str, file: Path, sha256: str) -> AdapterRecord:
        file, sha = check_publish_input(concept, file, sha256)
        db = self._read()
        with self._guard():
            check_publishable(self._held(db, concept), concept)  # fail fast, before copying

        rel = self._blob_relpath(sha)
        final = self.root / rel
        folder = final.parent
        folder_created = not folder.exists()
        tmp: Staged | None = None
        placed = False  # blob newly placed by us and not yet committed
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Staged(final)
            size, got = _copy_hashing(file, tmp.temp)
            if got != sha:
                raise sha_mismatch(file, got, sha)
            with self._tx() as db:
                held = check_publishable(self._held(db, concept), concept)  # under the lock
                old = db.execute(
                    "SELECT sha256 FROM adapters WHERE concept = ?", [concept]
                ).fetchone()
                placed = not final.exists()
                tmp.install()
                tmp = None
                now = utc_now()
                db.execute(
                    "INSERT INTO adapters (concept, slot, sha256, size, path, published_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(concept) DO UPDATE SET "
                    "slot = excluded.slot, sha256 = excluded.sha256, size = excluded.size, "
                    "path = excluded.path, published_at = excluded.published_at",
                    [concept, held.slot, sha, size, rel, now],
                )
                db.execute(
                    "UPDATE slots SET status = ?, published_at = ? WHERE concept = ?",
                    [PUBLISHED, now, concept],
                )
                self._event(
                    db,
                    "publish",
                    concept,
                    held.slot,
                    held.owner,
                    {"sha256": sha, "size": size, "replaces": old[0] if old else None},
                )
            placed = False
        except BaseException:
            if tmp is not None:
                tmp.discard()
            if placed:
                final.unlink(missing_ok=True)
            if folder_created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        if old and old[0] != sha:
            self._collect_blob(old[0])
        return AdapterRecord(
            concept=concept, slot=held.slot, sha256=sha, size=size, path=rel, published_at=now
        )

    def _collect_blob(self, sha: str) -> None:
        """Delete a blob no adapter row references any more (best effort, under the lock)."""
        with contextlib.suppress(BlockctlError, OSError), self._tx() as db:
            refs = db.execute("SELECT count(*) FROM adapters WHERE sha256 = ?", [sha]).fetchone()
            if refs[0] == 0:
                path = self.root / self._blob_relpath(sha)
                path.unlink(missing_ok=True)  # its shard folder stays: others may use it

    def adapters(self) -> list[AdapterRecord]:
        """Adapters of published concepts, by slot (those of released concepts are kept in
        the store and the table, but no longer listed)."""
        db = self._read()
        with self._guard():
            rows = db.query(
                "SELECT a.* FROM adapters a JOIN slots s ON s.concept = a.concept "
                "WHERE s.status = ? ORDER BY a.slot",
                [PUBLISHED],
            )
            return [_adapter_record(r) for r in rows]

    def _adapter(self, concept: str) -> tuple[SlotRecord | None, AdapterRecord | None]:
        db = self._read()
        with self._guard():
            held = self._held(db, concept)
            rows = list(db.query("SELECT * FROM adapters WHERE concept = ?", [concept]))
        return held, (_adapter_record(rows[0]) if rows else None)

    def adapter_file(self, concept: str) -> Path:
        return self._stored(published_adapter(*self._adapter(concept), concept))

    def released_adapter_file(self, concept: str) -> tuple[AdapterRecord, Path] | None:
        """The adapter of a released concept: its row and blob are kept (never collected)."""
        held, adapter = self._adapter(concept)
        if held is None or held.status != RELEASED or adapter is None:
            return None
        return adapter, self._stored(adapter)

    def _stored(self, adapter: AdapterRecord) -> Path:
        concept = adapter.concept
        path = self.root / adapter.path
        if not path.is_file():
            raise RegistryUnavailable(
                f"the stored adapter of concept {concept!r} is missing ({path})",
                hint="restore the registry folder from a backup, or publish the adapter again",
            )
        return path


def _copy_hashing(src: Path, dest: Path) -> tuple[int, str]:
    """Copy ``src`` to the new file ``dest``, hashing it on the way: (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "xb") as out, open(src, "rb") as inp:
        while chunk := inp.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(dest, 0o644)
    return size, digest.hexdigest()
