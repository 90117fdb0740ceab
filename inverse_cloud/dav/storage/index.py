"""The persisted per-collection index: href -> uid, etag, component, size, mtime, plus the change log behind
sync tokens.

One SQLite database (stdlib ``sqlite3``, WAL, ``synchronous=FULL``) for the whole store, next to
Radicale's own caches. Why SQLite and not files: one PUT is one small transaction (the item's row and
the collection's sequence number, atomically, one fsync of the WAL) where a file per collection would be
rewritten whole, or need a journal of our own; a UID check and "what changed since token T" are index
look-ups (``items_uid``, ``items_seq``) that never load the rest; nothing is parsed at start-up, and
SQLite's page cache bounds the memory the index holds, whatever the collection's size.

The item files stay the truth. A row is trusted only while it matches its file's size and mtime (Radicale's
own item-cache key) and a watch on the folder reports no change (watch.py). At a collection's first use
in a process every file is compared with its row (stat only); a difference is read through Radicale's
item cache and recorded as a change, so a file edited, added or removed behind the server's back shows
up in the next sync and listing.

Change log: every row carries the sequence number of its last change; a deletion leaves a tombstone
row. A sync token names the collection's generation (random, new when the collection is created or
replaced) and a sequence number; "changes since T" is every row with a larger number. Tombstones older
than Radicale's ``max_sync_token_age`` are dropped, and tokens older than the newest dropped one get
``ValueError`` like any token the index cannot serve (Radicale answers ``valid-sync-token``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, Protocol, TypeVar, cast

from inverse_cloud.dav.storage.schema import Found, open_database
from inverse_cloud.dav.storage.tokens import TOKEN_PREFIX, make_token, parse_token
from inverse_cloud.dav.storage.watch import DirWatcher

__all__ = ["TOKEN_PREFIX", "Folder", "Found", "Index", "IndexUnavailable", "parse_token"]

log = logging.getLogger(__name__)

# How often (at most) tombstones past max_sync_token_age are looked for in one collection.
PRUNE_INTERVAL_S = 3600.0


_A = TypeVar("_A")
_P = ParamSpec("_P")
_R = TypeVar("_R")


class IndexUnavailable(Exception):  # noqa: N818 (a state, not a failure the user sees)
    """The index cannot answer now (database unusable, disk full); the caller uses Radicale's own code."""


class Folder(Protocol):
    """What the index needs from a collection."""

    @property
    def path(self) -> str: ...

    @property
    def filesystem_path(self) -> str: ...

    def is_item_name(self, name: str) -> bool:
        """Whether a file of this name in the folder is an item (Radicale's rule)."""
        ...

    def read_items(self, hrefs: list[str]) -> dict[str, Found | None]:
        """href -> (uid, etag, kind) of each item file, through Radicale's item cache; None: not a
        valid item."""
        ...


@dataclass
class _Coll:
    id: int
    gen: str
    seq: int
    pruned_seq: int
    ino: int = -1
    scanned: bool = False
    pruned_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Row:
    etag: str | None
    size: int | None
    mtime_ns: int | None
    seq: int
    deleted: bool


def _guarded(method: Callable[Concatenate[Index, _A, _P], _R]) -> Callable[Concatenate[Index, _A, _P], _R]:
    """Database and file-system failures in ``method`` become IndexUnavailable (logged once). ``_A`` is the
    Folder, or the collection path, the call is about."""

    @functools.wraps(method)
    def guarded(self: Index, about: _A, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        path = about if isinstance(about, str) else cast(Folder, about).path
        try:
            result = method(self, about, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(path, exc) from exc
        except ValueError:
            raise                        # a token it cannot serve: an answer, not a failure
        except BaseException:
            with self._lock:
                self._colls.pop(path, None)  # e.g. a broken item file: compare again at the next use
            raise
        self._failing = False
        return result

    return guarded


class Index:
    """The index of every collection of one store. Thread-safe: Radicale calls from a pool of threads.

    Locks: ``_lock`` guards the database connection and the dictionaries, and is only held for a few
    statements; a collection's own lock is held while it is compared with its files (which may read many
    items), so a first use of one big collection never holds up requests on the others.

    Every public method raises :class:`IndexUnavailable` when the database cannot be used; the condition
    is logged once, and the collection is compared with its files again at its next use.
    """

    def __init__(self, db_path: str, max_token_age_s: float, max_item_bytes: int) -> None:
        self._db_path = db_path
        self._max_token_age_s = max_token_age_s
        self._max_item_bytes = max_item_bytes
        self._lock = threading.RLock()
        self._colls: dict[str, _Coll] = {}
        self._db: sqlite3.Connection | None = None
        self._failing = False
        # Reported by the watch, not yet looked at: names per folder, folders to compare whole.
        self._pending: dict[str, set[str]] = {}
        self._stale: set[str] = set()
        self._watcher: DirWatcher | None
        try:
            self._watcher = DirWatcher()
        except OSError as exc:
            log.warning("storage index: no inotify (%s): every request compares the collection's files", exc)
            self._watcher = None

    # --- database ---------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = open_database(self._db_path)
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise           # disk full, permissions, locked: the file may be fine
                # Not a database, or another schema: it only ever held what the item files say.
                log.warning("storage index %s is damaged (%s): building it again from the item files; clients "
                            "holding a sync token do one full sync", self._db_path, exc)
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._db_path + suffix)
                self._colls.clear()
                self._db = open_database(self._db_path)
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None

    def _unavailable(self, folder_path: str, exc: BaseException) -> IndexUnavailable:
        with self._lock:
            if not self._failing:
                log.warning("storage index %s unusable (%s): serving %r with Radicale's own storage code until "
                            "it recovers", self._db_path, exc, folder_path)
            self._failing = True
            self._colls.clear()       # reload and compare with the files at the next use
            if self._db is not None:
                self._db.close()
                self._db = None
        return IndexUnavailable(str(exc))

    # --- coherence --------------------------------------------------------------------------------

    def _coll(self, folder: Folder) -> _Coll:
        """The collection's state, compared with its files as far as the watch says it must be."""
        with self._lock:
            c = self._colls.get(folder.path)
            if c is None:
                db = self._conn()
                row = db.execute("SELECT id, gen, seq, pruned_seq FROM collections WHERE path=?",
                                 (folder.path,)).fetchone()
                if row is None:
                    gen = uuid.uuid4().hex
                    cur = db.execute("INSERT INTO collections(path, gen, seq) VALUES(?, ?, 0)", (folder.path, gen))
                    assert cur.lastrowid is not None
                    row = (cur.lastrowid, gen, 0, 0)
                c = _Coll(id=row[0], gen=row[1], seq=row[2], pruned_seq=row[3])
                self._colls[folder.path] = c
        with c.lock:      # a second request on this collection waits here until the comparison is done
            fs = folder.filesystem_path
            with self._lock:
                w = self._watcher
                if w is not None:
                    changes = w.drain()
                    if changes.overflow:
                        for cl in self._colls.values():
                            cl.scanned = False
                    self._stale.update(changes.whole)
                    for path, names_ in changes.names.items():
                        self._pending.setdefault(path, set()).update(names_)
                names = self._pending.pop(fs, set())
                whole = not c.scanned or fs in self._stale
                self._stale.discard(fs)
                ino = os.stat(fs).st_ino
                if ino != c.ino:
                    whole = True
                if w is not None and (whole or not w.is_watching(fs)):
                    try:
                        w.watch(fs)       # before the comparison: a change during it is reported next time
                    except OSError as exc:
                        log.warning("storage index: cannot watch %s (%s): each request compares its files", fs, exc)
                if w is None or not w.is_watching(fs):
                    whole = True
            if whole:
                self._compare_all(c, folder)
                c.ino, c.scanned = ino, True
            elif names:
                self._compare_names(c, folder, names)
        return c

    def _rows(self, c: _Coll, hrefs: Iterable[str] | None = None) -> dict[str, _Row]:
        q = "SELECT href, etag, size, mtime_ns, seq, deleted_at FROM items WHERE coll=?"
        with self._lock:
            db = self._conn()
            if hrefs is None:
                found = db.execute(q, (c.id,)).fetchall()
            else:
                hl, found = list(hrefs), []
                for i in range(0, len(hl), 500):
                    part = hl[i:i + 500]
                    found += db.execute(q + f" AND href IN ({','.join('?' * len(part))})", (c.id, *part)).fetchall()
            return {h: _Row(e, s, m, q_, d is not None) for h, e, s, m, q_, d in found}

    def _compare_all(self, c: _Coll, folder: Folder) -> None:
        listing: dict[str, os.stat_result] = {}
        with os.scandir(folder.filesystem_path) as entries:
            for entry in entries:
                if entry.is_file() and folder.is_item_name(entry.name):
                    listing[entry.name] = entry.stat()
        # Only what the comparison needs, as plain tuples: at 50,000 items full rows would cost ~20 MiB.
        with self._lock:
            known = {h: (size, mtime) for h, size, mtime in self._conn().execute(
                "SELECT href, size, mtime_ns FROM items WHERE coll=? AND deleted_at IS NULL", (c.id,))}
        stale = [h for h, st in listing.items() if known.get(h) != (st.st_size, st.st_mtime_ns)]
        gone = [h for h in known if h not in listing]
        del known
        if stale or gone:
            todo: dict[str, os.stat_result | None] = {h: listing[h] for h in stale}
            todo.update(dict.fromkeys(gone))
            self._apply(c, folder, todo, self._rows(c, todo))

    def _compare_names(self, c: _Coll, folder: Folder, names: set[str]) -> None:
        current: dict[str, os.stat_result | None] = {}
        for name in names:
            if not folder.is_item_name(name):
                continue
            try:
                st: os.stat_result | None = os.stat(os.path.join(folder.filesystem_path, name))
            except FileNotFoundError:
                st = None
            current[name] = st if st is not None and stat.S_ISREG(st.st_mode) else None
        if not current:
            return
        rows = self._rows(c, current)
        todo = {h: st for h, st in current.items()
                if not (_matches(rows.get(h), st) if st is not None else (h not in rows or rows[h].deleted))}
        if todo:
            self._apply(c, folder, todo, rows)

    def _apply(self, c: _Coll, folder: Folder, todo: dict[str, os.stat_result | None], rows: dict[str, _Row]
               ) -> None:
        """Record what the files now say for ``todo`` (href -> stat, None: gone), in one transaction.
        The items are read (through Radicale's item cache) before the database lock is taken."""
        found: dict[str, Found | None] = dict.fromkeys(sorted(todo))
        found.update(folder.read_items([h for h in found
                                        if (st := todo[h]) is not None and st.st_size <= self._max_item_bytes]))
        self._write(c, [(href, rows.get(href), found[href], todo[href]) for href in found])

    def _write(self, c: _Coll, changes: list[tuple[str, _Row | None, Found | None, os.stat_result | None]]) -> None:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = c.seq
                for href, row, found, st in changes:
                    seq = self._put_row(db, c, seq, href, row, found, st)
                db.execute("UPDATE collections SET seq=? WHERE id=?", (seq, c.id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            c.seq = seq

    def _put_row(self, db: sqlite3.Connection, c: _Coll, seq: int, href: str, row: _Row | None,
                 found: Found | None, st: os.stat_result | None) -> int:
        if found is None:
            if row is not None and not row.deleted:
                seq += 1
                db.execute("UPDATE items SET uid=NULL, etag=NULL, size=NULL, mtime_ns=NULL, seq=?, deleted_at=? "
                           "WHERE coll=? AND href=?", (seq, time.time(), c.id, href))
            return seq
        assert st is not None
        uid, etag, kind = found
        if row is None or row.deleted or row.etag != etag:
            seq += 1
            row_seq = seq
        else:
            row_seq = row.seq
        db.execute("INSERT OR REPLACE INTO items(coll, href, uid, etag, size, mtime_ns, seq, deleted_at, kind) "
                   "VALUES(?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                   (c.id, href, uid, etag, st.st_size, st.st_mtime_ns, row_seq, kind))
        return seq

    def _prune(self, c: _Coll) -> None:
        now = time.time()
        if now - c.pruned_at < PRUNE_INTERVAL_S:
            return
        c.pruned_at = now
        limit = now - self._max_token_age_s
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT max(seq) FROM items WHERE coll=? AND deleted_at < ?", (c.id, limit)).fetchone()
            if row[0] is None:
                return
            pruned = max(c.pruned_seq, int(row[0]))
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM items WHERE coll=? AND deleted_at < ?", (c.id, limit))
                db.execute("UPDATE collections SET pruned_seq=? WHERE id=?", (pruned, c.id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            c.pruned_seq = pruned

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    # --- queries ----------------------------------------------------------------------------------

    @_guarded
    def has_uid(self, folder: Folder, uid: str) -> bool:
        c = self._coll(folder)
        return bool(self._query("SELECT 1 FROM items INDEXED BY items_uid WHERE coll=? AND uid=? "
                                "AND deleted_at IS NULL LIMIT 1", (c.id, uid)))

    @_guarded
    def sync(self, folder: Folder, old_token: str) -> tuple[str, Iterable[str]]:
        """Radicale's ``BaseCollection.sync``: the current token and the hrefs changed since ``old_token``
        (every item, and the tombstones still kept, for an empty one).

        :raises ValueError: a malformed token, or one this index cannot serve.
        """
        c = self._coll(folder)
        with self._lock:
            seq_now, gen = c.seq, c.gen
        token = make_token(gen, seq_now)
        if not old_token:
            return token, [str(h) for (h,) in self._query("SELECT href FROM items WHERE coll=? ORDER BY href",
                                                          (c.id,))]
        gen_old, seq = parse_token(old_token)
        if gen_old != gen or seq > seq_now or seq < c.pruned_seq:
            raise ValueError(f"Token not found: {old_token!r}")
        if seq == seq_now:
            return token, ()
        return token, [str(h) for (h,) in self._query(
            "SELECT href FROM items WHERE coll=? AND seq>? AND seq<=? ORDER BY href", (c.id, seq, seq_now))]

    @_guarded
    def live_rows(self, folder: Folder) -> dict[str, tuple[str, str, str | None, int, int]]:
        """href -> (uid, etag, kind or None: not known, size, mtime_ns) of every item the collection holds,
        as its files now say."""
        c = self._coll(folder)
        return {str(h): (str(u), str(e), None if k is None else str(k), int(cast(int, s)), int(cast(int, m)))
                for h, u, e, k, s, m in self._query("SELECT href, uid, etag, kind, size, mtime_ns FROM items "
                                                    "WHERE coll=? AND deleted_at IS NULL", (c.id,))}

    @_guarded
    def state(self, folder: Folder) -> tuple[str, int, int]:
        """(generation, sequence number, newest item mtime in ns or 0): what the collection's etag and
        last-modified are made of."""
        c = self._coll(folder)
        with self._lock:
            # A tombstone's mtime_ns is NULL, which max() skips: the items_mtime index answers alone.
            row = self._conn().execute("SELECT max(mtime_ns) FROM items INDEXED BY items_mtime WHERE coll=?",
                                       (c.id,)).fetchone()
            return c.gen, c.seq, int(row[0] or 0)

    # --- our own writes ---------------------------------------------------------------------------

    @_guarded
    def record(self, folder: Folder, changes: dict[str, Found | None]) -> None:
        """This process changed items of ``folder``: href -> (uid, etag, kind) written, or None removed.
        Called under Radicale's write lock, after the files are on disk."""
        c = self._coll(folder)      # the watch reports our own write: usually already recorded here
        rows = self._rows(c, changes)
        todo: list[tuple[str, _Row | None, Found | None, os.stat_result | None]] = []
        for href, found in changes.items():
            st = None
            row = rows.get(href)
            if found is not None:
                st = os.stat(os.path.join(folder.filesystem_path, href))
                if _matches(row, st) and row is not None and row.etag == found[1]:
                    continue
            elif row is None or row.deleted:
                continue
            todo.append((href, row, found, st))
        if todo:
            self._write(c, todo)
        self._prune(c)

    @_guarded
    def forget(self, path: str) -> None:
        """The collection at ``path`` (and any below it) was deleted or replaced: its tokens end, its next
        use starts a new generation from its files."""
        with self._lock:
            db = self._conn()
            ids = [i for (i,) in db.execute("SELECT id FROM collections WHERE path=? OR path LIKE ? ESCAPE '\\'",
                                            (path, _like_prefix(path)))]
            db.execute("BEGIN IMMEDIATE")
            try:
                for i in ids:
                    db.execute("DELETE FROM items WHERE coll=?", (i,))
                    db.execute("DELETE FROM collections WHERE id=?", (i,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            for p in [p for p in self._colls if p == path or p.startswith(path + "/")]:
                del self._colls[p]


def _matches(row: _Row | None, st: os.stat_result) -> bool:
    return row is not None and not row.deleted and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns


def _like_prefix(path: str) -> str:
    return path.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"

