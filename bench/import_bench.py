#!/usr/bin/env python3
"""A big import and another user: one PUT of a whole calendar, while a second user keeps syncing.

    .venv/bin/python bench/import_bench.py                      # 5,000 events, ours then stock
    .venv/bin/python bench/import_bench.py --events 500 --only ours   # a smoke run

Each server (ours: ``inverse-cloud serve``; stock: Radicale 3.9's own server, the settings of
scale_bench.py) starts on an empty store with two users. Bob creates an address book with 20 cards and
takes a sync token. Alice then PUTs one .ics of N one-hour events to a new calendar (Radicale writes it as a
whole collection, one item per event). While her PUT runs, Bob sends a no-change sync-collection every
0.2 s on his own connection (a phone polling), and every answer's wall time is kept. Printed per side: the
import's wall time, Bob's sync latency during it (count, p50, max), and Alice's first sync of the new
calendar. Nothing is asserted: exit 1 only on a wrong answer (the import not 201, the calendar not holding
N items, a sync of Bob's reporting changes).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dav_bench import PASSWORD, USER, make_certificates  # noqa: E402
from scale_bench import BenchError, Client, Ours, StockSide, log  # noqa: E402
from scale_store import BOOK, Kind, make_event  # noqa: E402

BOB, BOB_PASSWORD = "bob", "bob-password"
POLL_S = 0.2


def calendar(n: int) -> bytes:
    rng = random.Random(11)
    body = []
    for i in range(n):
        _, text = make_event(i, rng)
        lines = text.split("\r\n")
        body += lines[lines.index("BEGIN:VEVENT"):lines.index("END:VEVENT") + 1]
    return "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//inverse-cloud//import_bench//EN",
                        "X-WR-CALNAME:imported", *body, "END:VCALENDAR", ""]).encode()


def client(side: Any, cafile: str, user: str, password: str) -> Client:
    c = Client(side.port, cafile, side.prefix)
    c.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return c


def run_side(side: Any, ics: bytes, n: int, cafile: str) -> dict[str, float]:
    out: dict[str, float] = {}
    side.start()
    bob = client(side, cafile, BOB, BOB_PASSWORD)
    alice = client(side, cafile, USER, PASSWORD)
    try:
        bob.req("PROPFIND", f"/{BOB}/", headers={"Depth": "0"})
        st, data, _ = bob.req("MKCOL", f"/{BOB}/{BOOK}/", (
            b'<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:carddav"><d:set>'
            b'<d:prop><d:resourcetype><d:collection/><c:addressbook/></d:resourcetype></d:prop></d:set>'
            b'</d:mkcol>'))
        if st != 201:
            raise BenchError(f"{side.label}: MKCOL -> {st} {data[:200]!r}")
        kind = Kind(False)
        rng = random.Random(3)
        for i in range(20):
            uid, text = kind.make(i, rng)
            st, _, _ = bob.req("PUT", f"/{BOB}/{BOOK}/{uid}.vcf", text.encode(), {"Content-Type": "text/vcard"})
            if st != 201:
                raise BenchError(f"{side.label}: Bob's PUT -> {st}")
        bob_path = f"/{BOB}/{BOOK}/"
        token, _, _ = bob.sync("", bob_path)
        alice.req("PROPFIND", f"/{USER}/", headers={"Depth": "0"})
        result: dict[str, Any] = {}

        def do_import() -> None:
            t0 = time.perf_counter()
            try:
                result["status"], result["body"], _ = alice.req("PUT", f"/{USER}/imported/", ics,
                                                                 {"Content-Type": "text/calendar"})
            finally:
                result["s"] = time.perf_counter() - t0

        importer = threading.Thread(target=do_import)
        importer.start()
        lat: list[float] = []
        while importer.is_alive():
            t0 = time.perf_counter()
            token2, count, _ = bob.sync(token, bob_path)
            lat.append((time.perf_counter() - t0) * 1000)
            if count or token2 != token:
                raise BenchError(f"{side.label}: Bob's no-change sync reported {count} changes")
            importer.join(POLL_S)
        if result.get("status") != 201:
            raise BenchError(f"{side.label}: import -> {result.get('status')} {result.get('body', b'')[:300]!r}")
        out["import_s"] = result["s"]
        out["bob_syncs"] = len(lat)
        out["bob_p50_ms"] = statistics.median(lat) if lat else float("nan")
        out["bob_max_ms"] = max(lat) if lat else float("nan")
        t0 = time.perf_counter()
        _, count, _ = alice.sync("", f"/{USER}/imported/")
        out["first_sync_ms"] = (time.perf_counter() - t0) * 1000
        if count != n:
            raise BenchError(f"{side.label}: the imported calendar lists {count} items, expected {n}")
    finally:
        bob.close()
        alice.close()
        side.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--only", choices=["ours", "stock"])
    args = ap.parse_args()
    import bcrypt

    state = Path(tempfile.mkdtemp(prefix="icimport-"))
    cafile, chain, key = make_certificates(state / "cert")
    lines = "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                    for u, p in ((USER, PASSWORD), (BOB, BOB_PASSWORD)))
    sides: dict[str, Any] = {}
    if args.only != "stock":
        sides["ours"] = Ours(state / "ours", chain, key, lines)
    if args.only != "ours":
        sides["stock"] = StockSide(state / "stock", state / "cert", lines)
    ics = calendar(args.events)
    log(f"{args.events} events, {len(ics) / 1e6:.1f} MB")
    res: dict[str, dict[str, float]] = {}
    failed = False
    for name, side in sides.items():
        log(f"{name}: import")
        try:
            res[name] = run_side(side, ics, args.events, str(cafile))
        except BenchError as exc:
            log(f"FAILED: {exc}")
            failed = True
            continue
        log(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res[name].items()))
    shutil.rmtree(state, ignore_errors=True)
    print(f"import_bench ({dt.datetime.now():%Y-%m-%d %H:%M}, one PUT of {args.events} events, "
          f"{len(ics) / 1e6:.1f} MB; Bob's no-change sync every {POLL_S} s meanwhile)")
    print(f"{'side':8}{'import (s)':>12}{'Bob syncs':>11}{'Bob p50 ms':>12}{'Bob max ms':>12}{'1st sync ms':>13}")
    for name, r in res.items():
        print(f"{name:8}{r['import_s']:12.1f}{r['bob_syncs']:11.0f}{r['bob_p50_ms']:12.1f}{r['bob_max_ms']:12.1f}"
              f"{r['first_sync_ms']:13.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
