"""Versioned schema migrations for the local (SQLite) registry.

The pattern follows simonw's ``llm``: an ordered list of migration functions, each applied
once, recorded by name (with the time it was applied) in the ``_blockctl_migrations`` table.
``migrate`` applies the pending ones inside one ``BEGIN IMMEDIATE`` transaction, so
concurrent processes opening the same registry never apply a migration twice.

Rules for adding a migration: add a new ``mNNN_description`` function (decorated with
``@migration``) after the last one, above ``SCHEMA_VERSION``; never edit, rename, reorder
or remove one that has been released. The schema version of a database is the number of
migrations applied to it. A database holding a migration name this code does not know was
written by a newer blockctl and is refused (``NewerSchemaError``) rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone

from registry.sqlite_db import Database

MIGRATIONS_TABLE = "_blockctl_migrations"

Migration = Callable[[Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration (order of definition is order of application)."""
    MIGRATIONS.append(fn)
    return fn


class NewerSchemaError(Exception):
    """The database records migrations this code does not know: a newer blockctl made it."""

    def __init__(self, unknown: list[str]) -> None:
        super().__init__(", ".join(unknown))
        self.unknown = unknown


def utc_now() -> str:
    """ISO-8601 UTC, millisecond precision, e.g. ``2025-01-31T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- the migrations, oldest first ------------------------------------------------------------


@migration
def m001_initial(db: Database) -> None:
    """layout (one row), slots, adapters, events."""
    db.table("layout").create(
        {"id": int, "json": str, "schema_version": int, "created_at": str},
        pk="id",
        not_null={"json", "schema_version", "created_at"},
    )
    db.table("slots").create(
        {
            "slot": int,
            "concept": str,
            "token": str,
            "class_word": str,
            "owner": str,
            "status": str,
            "reserved_at": str,
            "published_at": str,
            "released_at": str,
        },
        pk="slot",
        not_null={"concept", "token", "class_word", "owner", "status", "reserved_at"},
    )
    # Exact uniqueness (also the parent key of adapters.concept) ...
    db.table("slots").create_index(["concept"], index_name="slots_concept_unique", unique=True)
    db.table("slots").create_index(["token"], index_name="slots_token_unique", unique=True)
    # ... and case-insensitive uniqueness: concept names become file names (case-insensitive
    # file systems) and tokenizers such as CLIP's lowercase their input.
    db.execute("CREATE UNIQUE INDEX slots_concept_nocase ON slots(concept COLLATE NOCASE)")
    db.execute("CREATE UNIQUE INDEX slots_token_nocase ON slots(token COLLATE NOCASE)")
    db.table("adapters").create(
        {
            "concept": str,
            "slot": int,
            "sha256": str,
            "size": int,
            "path": str,
            "published_at": str,
        },
        pk="concept",
        not_null={"slot", "sha256", "size", "path", "published_at"},
        foreign_keys=[("concept", "slots", "concept")],
    )
    db.table("adapters").create_index(["sha256"], index_name="adapters_sha256")
    db.table("events").create(
        {
            "id": int,
            "time": str,
            "action": str,
            "concept": str,
            "slot": int,
            "owner": str,
            "detail": str,
        },
        pk="id",
        not_null={"time", "action"},
    )


@migration
def m002_folded_name_keys(db: Database) -> None:
    """Name uniqueness by ``registry.base.fold`` (Unicode-aware, the Hub backend's rule too)
    instead of ``COLLATE NOCASE``, which folds ASCII only: each slot row stores its folded
    concept and token, UNIQUE-indexed, and a row without them is refused."""
    from registry.base import fold

    db.execute("ALTER TABLE slots ADD COLUMN concept_key TEXT")
    db.execute("ALTER TABLE slots ADD COLUMN token_key TEXT")
    seen: dict[str, set[str]] = {"concept": set(), "token": set()}
    rows = db.execute("SELECT slot, concept, token FROM slots ORDER BY slot").fetchall()
    for slot, concept, token in rows:
        keys = {}
        for column, name in (("concept", concept), ("token", token)):
            key = fold(name)
            if key in seen[column]:
                # Two names the old rule let through but the new one calls the same: both
                # stay (records are never dropped); the later one's key gets its slot number
                # ('/' never occurs in a name), and new names still clash with the first.
                key = f"{key}/{slot}"
            seen[column].add(key)
            keys[column] = key
        db.execute(
            "UPDATE slots SET concept_key = ?, token_key = ? WHERE slot = ?",
            [keys["concept"], keys["token"], slot],
        )
    db.execute("DROP INDEX slots_concept_nocase")
    db.execute("DROP INDEX slots_token_nocase")
    db.execute("CREATE UNIQUE INDEX slots_concept_key ON slots(concept_key)")
    db.execute("CREATE UNIQUE INDEX slots_token_key ON slots(token_key)")
    # ALTER TABLE cannot add NOT NULL columns to existing rows; a trigger enforces it instead.
    db.execute(
        "CREATE TRIGGER slots_keys_required BEFORE INSERT ON slots "
        "WHEN NEW.concept_key IS NULL OR NEW.token_key IS NULL "
        "BEGIN SELECT RAISE(ABORT, 'slots.concept_key and slots.token_key are required'); END"
    )


# -- new migrations go above this line ------------------------------------------------------

SCHEMA_VERSION = len(MIGRATIONS)


def current_version() -> int:
    """The schema version this code migrates to (``SCHEMA_VERSION`` unless patched in tests)."""
    return len(MIGRATIONS)


def known() -> list[str]:
    """Names of the migrations this code knows, in order."""
    return [fn.__name__ for fn in MIGRATIONS]


# -- applying them ----------------------------------------------------------------------------


def has_migrations_table(db: Database) -> bool:
    return db[MIGRATIONS_TABLE].exists()


def applied(db: Database) -> list[str]:
    """Names of the applied migrations, in the order they were applied."""
    if not has_migrations_table(db):
        return []
    return [r["name"] for r in db.query(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY rowid")]


def _check_known(names: list[str]) -> None:
    names_known = set(known())
    unknown = [n for n in names if n not in names_known]
    if unknown:
        raise NewerSchemaError(unknown)


def migrate(db: Database) -> list[str]:
    """Apply every pending migration; return the names applied now.

    Runs in one ``BEGIN IMMEDIATE`` transaction (rolled back as a whole on failure). The
    connection must not be inside a transaction. Raises ``NewerSchemaError`` when the
    database knows migrations this code does not.
    """
    conn = db.conn
    if conn.in_transaction:
        raise RuntimeError("migrate() must not run inside an open transaction")
    # Fast path without the write lock: nothing to do (the common case on every open).
    if has_migrations_table(db):
        done = applied(db)
        _check_known(done)
        if len(done) == len(MIGRATIONS):
            return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        db.table(MIGRATIONS_TABLE).create(
            {"name": str, "applied_at": str},
            pk="name",
            not_null={"applied_at"},
            if_not_exists=True,
        )
        done = applied(db)  # again, under the lock: another process may have migrated
        _check_known(done)
        now_applied: list[str] = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(db)
            db.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)",
                [fn.__name__, utc_now()],
            )
            now_applied.append(fn.__name__)
        if now_applied and db["layout"].exists():
            db.execute("UPDATE layout SET schema_version = ?", [current_version()])
        conn.execute("COMMIT")
    except BaseException:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise
    return now_applied
