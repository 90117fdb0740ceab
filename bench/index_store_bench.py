#!/usr/bin/env python3
"""How to persist the storage index: SQLite (WAL) against a file snapshot + fsync'ed journal.

    .venv/bin/python bench/index_store_bench.py --sizes 10000,50000

For N rows (href, uid, etag, size, mtime_ns, seq) of one collection, each store is timed (ms, p50 of
--reps) for what the storage plugin does: record one change durably (one fsync), check a UID, list the
changes since a sequence number (10 changes), and open the store at start-up until the first answer;
plus the bytes on disk and the memory it holds in the process (tracemalloc of the Python objects after
opening, and RSS growth over the whole run, which includes SQLite's page cache).

  sqlite: the plugin's schema (WITHOUT ROWID items, indexes on uid and seq), WAL, synchronous=FULL;
          queries go to the database, nothing is loaded at start.
  files:  a pickled dict href -> row (the in-memory index) plus a uid set, snapshot at start, each change
          appended to a journal and fsync'ed; queries are dict/set look-ups, "changes since" scans the dict.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inverse_cloud.dav.storage.schema import SCHEMA as _SCHEMA  # noqa: E402


def rows(n: int) -> list[tuple[str, str, str, int, int, int]]:
    return [(f"{uuid.uuid4()}.vcf", str(uuid.uuid4()), f'"{os.urandom(32).hex()}"', 2000 + i, 10**18 + i, i + 1)
            for i in range(n)]


def ms(f, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_sqlite(d: Path, data: list, reps: int) -> dict[str, float]:
    path = str(d / "index.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    db.execute("BEGIN")
    db.executemany("INSERT INTO items(coll, href, uid, etag, size, mtime_ns, seq) VALUES(1, ?, ?, ?, ?, ?, ?)", data)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    out: dict[str, float] = {}
    tracemalloc.start()
    r0 = rss_kib()
    t0 = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("SELECT max(seq) FROM items WHERE coll=1").fetchone()
    out["open_ms"] = (time.perf_counter() - t0) * 1000
    out["held_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    seq = [len(data)]

    def change() -> None:
        seq[0] += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO items(coll, href, uid, etag, size, mtime_ns, seq) VALUES(1, ?, ?, ?, 1, 1, ?)",
                   (f"new-{seq[0]}.vcf", f"u-{seq[0]}", '"x"', seq[0]))
        db.execute("COMMIT")

    out["change_ms"] = ms(change, reps)
    uids = [r[1] for r in data[:: max(1, len(data) // reps)]]
    it = iter(uids * 2)
    out["has_uid_ms"] = ms(lambda: db.execute("SELECT 1 FROM items WHERE coll=1 AND uid=? LIMIT 1",
                                              (next(it),)).fetchone(), reps)
    out["since_ms"] = ms(lambda: db.execute("SELECT href FROM items WHERE coll=1 AND seq>?",
                                            (seq[0] - 10,)).fetchall(), reps)
    # A full comparison at first use reads every row once (that puts the table in SQLite's page cache).
    out["all_rows_ms"] = ms(lambda: db.execute("SELECT href, etag, size, mtime_ns, seq FROM items WHERE coll=1")
                            .fetchall(), 3)
    out["rss_growth_mib"] = (rss_kib() - r0) / 1024
    out["disk_mib"] = sum(p.stat().st_size for p in d.iterdir()) / 2**20
    db.close()
    return out


def bench_files(d: Path, data: list, reps: int) -> dict[str, float]:
    snap = d / "index.pickle"
    with open(snap, "wb") as f:
        pickle.dump({r[0]: r[1:] for r in data}, f, protocol=pickle.HIGHEST_PROTOCOL)
    out: dict[str, float] = {}
    tracemalloc.start()
    r0 = rss_kib()
    t0 = time.perf_counter()
    with open(snap, "rb") as f:
        index: dict[str, tuple] = pickle.load(f)  # noqa: S301 (the file this bench just wrote)
    uid_set = {v[0] for v in index.values()}
    out["open_ms"] = (time.perf_counter() - t0) * 1000
    out["held_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    journal = open(d / "index.journal", "ab")  # noqa: SIM115
    seq = [len(data)]

    def change() -> None:
        seq[0] += 1
        row = (f"new-{seq[0]}.vcf", f"u-{seq[0]}", '"x"', 1, 1, seq[0])
        journal.write(pickle.dumps(row))
        journal.flush()
        os.fsync(journal.fileno())
        index[row[0]] = row[1:]
        uid_set.add(row[1])

    out["change_ms"] = ms(change, reps)
    uids = [r[1] for r in data[:: max(1, len(data) // reps)]]
    it = iter(uids * 2)
    out["has_uid_ms"] = ms(lambda: next(it) in uid_set, reps)
    out["since_ms"] = ms(lambda: [h for h, v in index.items() if v[4] > seq[0] - 10], reps)
    out["all_rows_ms"] = ms(lambda: list(index.items()), 3)
    out["rss_growth_mib"] = (rss_kib() - r0) / 1024
    journal.close()
    out["disk_mib"] = sum(p.stat().st_size for p in d.iterdir()) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    keys = ["change_ms", "has_uid_ms", "since_ms", "open_ms", "all_rows_ms", "held_mib", "rss_growth_mib", "disk_mib"]
    print(f"{'N':>7} {'store':7} " + " ".join(f"{k:>14}" for k in keys))
    for n in (int(x) for x in args.sizes.split(",")):
        data = rows(n)
        for name, fn in (("sqlite", bench_sqlite), ("files", bench_files)):
            d = Path(tempfile.mkdtemp(prefix="icindex-", dir=os.environ.get("INDEX_BENCH_DIR")))
            try:
                res = fn(d, data, args.reps)
            finally:
                shutil.rmtree(d)
            print(f"{n:>7} {name:7} " + " ".join(f"{res[k]:14.3f}" for k in keys), flush=True)
    print("(ms: p50; held_mib: Python objects the open store holds (tracemalloc); rss_growth_mib: ru_maxrss growth, so the first "
          "store run in the process carries the imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
