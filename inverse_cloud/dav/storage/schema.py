"""The index database (index.py): its tables, its schema version, and the upgrade from each earlier one.

An index whose schema is unknown (newer, or damaged) is not upgraded: index.py rebuilds it from the item
files, which stay the truth.
"""

from __future__ import annotations

import os
import sqlite3

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Found", "open_database"]

SCHEMA_VERSION = "2"     # 2: items.kind (Found), which calendar listings name

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections(
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, gen TEXT NOT NULL,
    seq INTEGER NOT NULL, pruned_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS items(
    coll INTEGER NOT NULL, href TEXT NOT NULL, uid TEXT, etag TEXT, size INTEGER, mtime_ns INTEGER,
    seq INTEGER NOT NULL, deleted_at REAL, kind TEXT, PRIMARY KEY(coll, href)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_uid ON items(coll, uid);
CREATE INDEX IF NOT EXISTS items_seq ON items(coll, seq);
CREATE INDEX IF NOT EXISTS items_mtime ON items(coll, mtime_ns);
"""
# The look-ups name their index (INDEXED BY): left to itself, SQLite 3.40 walks the collection's primary key
# for "coll=? AND uid=? AND deleted_at IS NULL", 9 ms at 50,000 items instead of 0.01 ms.


# What an item file says, as Radicale reads it: (uid, etag, kind), kind being the object's name and its
# component's, "VCALENDAR/VEVENT" or "VCARD/" (what a listing's content type is made of).
Found = tuple[str, str, str]


def open_database(path: str) -> sqlite3.Connection:
    """The index at ``path`` (created if missing, upgraded from an earlier schema).

    :raises sqlite3.DatabaseError: not a database, or a schema this version does not know.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the client hears 201, so a token handed out before a power
        # loss never names a change the index forgot (one fsync of the WAL per write).
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta(key, value) VALUES('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] == "1":
            _upgrade_from_1(db)
        elif row[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"index schema {row[0]}, expected {SCHEMA_VERSION}")
        os.chmod(path, 0o600)
    except BaseException:
        db.close()
        raise
    return db


def _upgrade_from_1(db: sqlite3.Connection) -> None:
    """Schema 1 had no kind column. Add it, and forget each row's size, so that the next comparison of
    each collection reads its items once through Radicale's item cache and fills it in. Their etags are
    unchanged, so no change is recorded and every sync token stays valid."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE items ADD COLUMN kind TEXT")
        db.execute("UPDATE items SET size=NULL WHERE deleted_at IS NULL")
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
