#!/usr/bin/env python3
"""Storage scale benchmark: per-operation cost against collection size, ours against stock Radicale.

    .venv/bin/python bench/scale_bench.py --sizes 500,2000,8000            # the documented run
    .venv/bin/python bench/scale_bench.py --sizes 500,2000,8000,20000 --calendar 50000
    .venv/bin/python bench/scale_bench.py --sizes 200,800 --reps 5          # a smoke run (~1 min)

For each size N one collection of N items (address book of the seed workload's vCards, 10% with a 15 kB
photo; or, with ``--calendar N``, a calendar of N one-hour events) is written straight into a storage
folder, as a restore or an import would leave it. Each server then runs on its own copy, one after the
other, the order alternating per size:

  ours:  ``inverse-cloud serve`` (tests.support.init_instance + ServeProcess), whatever storage it configures;
  stock: Radicale 3.9's own server from the same venv, ``[storage] type = multifilesystem``.

Both on loopback TLS with the same certificate, the same bcrypt htpasswd line with ``cache_logins``, and
``use_mtime_and_size_for_item_cache``; fsync on (Radicale's default) on both sides. One keep-alive
connection with preemptive Basic auth, as DAVx5. Timed per side (wall time, ms):

  start-up            process start until the TLS port answers (cold: the store was just copied in)
  first request       the first sync-collection (no token) on the fresh store: every item is read once
  PUT                 a new item (If-None-Match: *), --reps times, p50
  GET                 one existing item, --reps times, p50
  sync no change      sync-collection with the current token, p50
  sync 10 changes     10 items rewritten (untimed), then sync-collection with the previous token, p50
  multiget 100        addressbook-/calendar-multiget of 100 items, p50 (and ms per KB of its answer)
  PROPFIND Depth 1    resourcetype + getetag + getcontenttype of every item (3 runs, p50; ms per KB)
  DELETE              one of the items PUT above, p50
  restart: start-up   stop (SIGTERM), start again on the same store
  restart: 1st req    the first request after that restart: sync-collection with the token from before

and RSS (MiB) after the operations. The table gives each operation's p50 per size for both sides, the
ratio ours/stock at each size and the growth exponent b of a least-squares fit t = a * N^b over the sizes
(b ~ 0: flat in N; b ~ 1: linear). Nothing is asserted: the exit code is 1 only if a server did not start
or an answer was wrong (a sync reporting the wrong number of changes, a failed PUT).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "seed-stack" / "workload"))
sys.path.insert(0, str(HERE.parent))

from dav_bench import HOST, PASSWORD, USER, OurSide, make_certificates, memory  # noqa: E402
from scale_store import BOOK, Kind, write_store  # noqa: E402

from tests.support import free_port, tls_handshake_ok, wait_until  # noqa: E402

OPS = [
    ("startup_s", "start-up (cold store)", "s"),
    ("first_ms", "first request (cold store)", "ms"),
    ("put_ms", "PUT p50", "ms"),
    ("get_ms", "GET p50", "ms"),
    ("sync_nochange_ms", "sync-collection, no change", "ms"),
    ("sync_10_ms", "sync-collection, 10 changes", "ms"),
    ("multiget_ms", "multiget of 100", "ms"),
    ("propfind_ms", "PROPFIND Depth 1", "ms"),
    ("multiget_ms_kb", "multiget: ms per KB answered", "ms"),
    ("propfind_ms_kb", "PROPFIND Depth 1: ms per KB", "ms"),
    ("delete_ms", "DELETE p50", "ms"),
    ("restart_startup_s", "restart: start-up", "s"),
    ("restart_first_ms", "restart: first request", "ms"),
    ("rss_mib", "RSS after the operations (MiB)", "MiB"),
]


def log(msg: str) -> None:
    print(f"[scale_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A server did not start, or gave a wrong answer."""


# --- the client -----------------------------------------------------------------------------------

class Client:
    """One keep-alive HTTPS connection to 127.0.0.1:port, SNI and certificate check for HOST."""

    def __init__(self, port: int, cafile: str, prefix: str) -> None:
        self.ctx = ssl.create_default_context(cafile=cafile)
        self.port, self.prefix = port, prefix
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.conn: http.client.HTTPSConnection | None = None

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(HOST, self.port, timeout=900)
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=900)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = self.ctx.wrap_socket(sock, server_hostname=HOST)
        return conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def req(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> tuple[int, bytes, float]:
        hdrs = {"Authorization": self.auth, "Content-Length": str(len(body)), **(headers or {})}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            t0 = time.perf_counter()
            try:
                self.conn.request(method, self.prefix + path, body=body, headers=hdrs)
                r = self.conn.getresponse()
                data = r.read()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
                continue
            return r.status, data, (time.perf_counter() - t0) * 1000
        raise AssertionError("unreachable")

    def sync(self, token: str, path: str = f"/{USER}/{BOOK}/") -> tuple[str, int, float]:
        body = ('<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token>'
                f'{token}</d:sync-token><d:sync-level>1</d:sync-level><d:prop><d:getetag/></d:prop>'
                '</d:sync-collection>').encode()
        st, data, ms = self.req("REPORT", path, body,
                                {"Content-Type": "application/xml; charset=utf-8", "Depth": "1"})
        if st != 207:
            raise BenchError(f"sync-collection -> {st}: {data[:300]!r}")
        m = re.search(rb"sync-token>([^<]+)<", data)
        if not m:
            raise BenchError(f"no sync-token in {data[:300]!r}")
        return m.group(1).decode(), len(re.findall(rb"<(?:\w+:)?response[ >]", data)), ms


# --- the servers ----------------------------------------------------------------------------------

class StockSide:
    """Radicale's own server (``python -m radicale``) with TLS, the same settings that matter."""

    label = "stock"
    prefix = ""

    def __init__(self, root: Path, cert_dir: Path, htpasswd_line: str) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.storage_dir = root / "collections"
        self.port = free_port()
        (root / "users").write_text(htpasswd_line)
        (root / "config").write_text(
            f"[server]\nhosts = 127.0.0.1:{self.port}\nssl = True\ncertificate = {cert_dir / 'fullchain.pem'}\n"
            f"key = {cert_dir / 'privkey.pem'}\n"
            f"[auth]\ntype = htpasswd\nhtpasswd_filename = {root / 'users'}\nhtpasswd_encryption = autodetect\n"
            "cache_logins = True\n"
            "[rights]\ntype = owner_only\n"
            f"[storage]\ntype = multifilesystem\nfilesystem_folder = {self.storage_dir}\n"
            "use_mtime_and_size_for_item_cache = True\n"
            "[logging]\nlevel = warning\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "RADICALE_CONFIG"}
        self.log = open(self.root / "radicale.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "radicale", "-C", str(self.root / "config")],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"radicale exited: {(self.root / 'radicale.log').read_text()[-2000:]}")
            return tls_handshake_ok("127.0.0.1", self.port)

        wait_until(ready, 120, "stock radicale", interval_s=0.005)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Ours:
    label = "ours"
    prefix = "/radicale"

    def __init__(self, root: Path, chain: bytes, key: bytes, htpasswd_line: str) -> None:
        from inverse_cloud.config import load

        self.side = OurSide(root, chain, key, htpasswd_line, "", {})
        self.storage_dir = load(self.side.config).server.storage_dir
        self.port = self.side.port

    def start(self) -> float:
        t0 = time.perf_counter()
        self.side.proc.start(timeout_s=120)
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.side.proc.stop()

    @property
    def pid(self) -> int:
        return self.side.proc.pid


# --- one run --------------------------------------------------------------------------------------

def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def run_side(side: Any, store: Path, kind: Kind, uids: list[str], reps: int, cafile: str) -> dict[str, float]:
    target = side.storage_dir / "collection-root" / USER
    if side.storage_dir.exists():
        shutil.rmtree(side.storage_dir / "collection-root", ignore_errors=True)
        for cache in side.storage_dir.glob(".Radicale.cache*"):
            (shutil.rmtree if cache.is_dir() else os.remove)(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store / "collection-root" / USER, target)
    out: dict[str, float] = {}
    rng = random.Random(7)
    out["startup_s"] = side.start()
    c = Client(side.port, cafile, side.prefix)
    try:
        c.req("PROPFIND", f"/{USER}/", headers={"Depth": "0"})      # log in (bcrypt once), not timed
        token, count, out["first_ms"] = c.sync("")
        if count < len(uids):
            raise BenchError(f"{side.label}: initial sync reported {count} items, expected {len(uids)}")
        coll = f"/{USER}/{BOOK}/"
        new: list[str] = []
        times: list[float] = []
        for i in range(reps):
            uid, text = kind.make(10**6 + i, rng)
            st, data, ms = c.req("PUT", f"{coll}{uid}{kind.suffix}", text.encode(),
                                 {"Content-Type": kind.ctype, "If-None-Match": "*"})
            if st not in (201, 204):
                raise BenchError(f"{side.label}: PUT -> {st} {data[:200]!r}")
            new.append(uid)
            times.append(ms)
        out["put_ms"] = p50(times)
        times = []
        for _ in range(reps):
            uid = rng.choice(uids)
            st, data, ms = c.req("GET", f"{coll}{uid}{kind.suffix}")
            if st != 200:
                raise BenchError(f"{side.label}: GET -> {st}")
            times.append(ms)
        out["get_ms"] = p50(times)
        token, _, _ = c.sync(token)
        times = []
        for _ in range(reps):
            token2, count, ms = c.sync(token)
            if count or token2 != token:
                raise BenchError(f"{side.label}: a no-change sync reported {count} changes")
            times.append(ms)
        out["sync_nochange_ms"] = p50(times)
        times = []
        for r in range(reps):
            for j in range(10):
                uid = uids[(r * 10 + j) % len(uids)]
                _, text = kind.make(2 * 10**6 + r * 10 + j, rng)
                text = re.sub(r"UID:[^\r\n]*", f"UID:{uid}", text, count=1)
                st, data, _ = c.req("PUT", f"{coll}{uid}{kind.suffix}", text.encode(), {"Content-Type": kind.ctype})
                if st not in (201, 204):
                    raise BenchError(f"{side.label}: PUT (change) -> {st} {data[:200]!r}")
            token, count, ms = c.sync(token)
            if count != 10:
                raise BenchError(f"{side.label}: sync after 10 changes reported {count}")
            times.append(ms)
        out["sync_10_ms"] = p50(times)
        times = []
        for _ in range(max(3, reps // 3)):
            hrefs = [f"{side.prefix}{coll}{u}{kind.suffix}" for u in rng.sample(uids, min(100, len(uids)))]
            st, data, ms = c.req("REPORT", coll, kind.multiget(hrefs),
                                 {"Content-Type": "application/xml; charset=utf-8", "Depth": "1"})
            if st != 207:
                raise BenchError(f"{side.label}: multiget -> {st}")
            times.append(ms)
        out["multiget_ms"] = p50(times)
        out["multiget_ms_kb"] = out["multiget_ms"] / (len(data) / 1024)
        times = []
        body = (b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getetag/>'
                b'<d:getcontenttype/></d:prop></d:propfind>')
        for _ in range(3):
            st, data, ms = c.req("PROPFIND", coll, body, {"Depth": "1", "Content-Type": "application/xml"})
            if st != 207:
                raise BenchError(f"{side.label}: PROPFIND -> {st}")
            times.append(ms)
        out["propfind_ms"] = p50(times)
        out["propfind_ms_kb"] = out["propfind_ms"] / (len(data) / 1024)
        times = []
        for uid in new:
            st, data, ms = c.req("DELETE", f"{coll}{uid}{kind.suffix}")
            if st not in (200, 204):
                raise BenchError(f"{side.label}: DELETE -> {st}")
            times.append(ms)
        out["delete_ms"] = p50(times)
        token, _, _ = c.sync(token)
        out["rss_mib"] = memory({"p": [side.pid]})["rss_mib"]
    finally:
        c.close()
        side.stop()
    out["restart_startup_s"] = side.start()
    c = Client(side.port, cafile, side.prefix)
    try:
        c.req("PROPFIND", f"/{USER}/", headers={"Depth": "0"})      # log in, not timed
        _, count, out["restart_first_ms"] = c.sync(token)
        if count:
            raise BenchError(f"{side.label}: the first sync after a restart reported {count} changes")
    finally:
        c.close()
        side.stop()
    return out


def exponent(sizes: list[int], values: list[float]) -> float:
    """b of the least-squares fit log t = log a + b log N."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(sizes, values, strict=True) if v > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.2f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def table(title: str, sizes: list[int], res: dict[str, dict[int, dict[str, float]]], sides: list[str]) -> list[str]:
    lines = [title, ""]
    head = f"{'operation':32}" + "".join(f"{s + ' N=' + str(n):>16}" for s in sides for n in sizes)
    if len(sides) == 2:
        head += "".join(f"{'ratio N=' + str(n):>12}" for n in sizes)
    head += "".join(f"{'b ' + s:>9}" for s in sides)
    lines.append(head)
    for key, name, unit in OPS:
        row = f"{name + (' (s)' if unit == 's' else ''):32}"
        for s in sides:
            row += "".join(f"{fmt(res[s][n][key], unit):>16}" for n in sizes)
        if len(sides) == 2:
            for n in sizes:
                a, b = res[sides[0]][n][key], res[sides[1]][n][key]
                row += f"{(a / b if b else float('nan')):12.3f}"
        for s in sides:
            row += f"{exponent(sizes, [res[s][n][key] for n in sizes]):9.2f}"
        lines.append(row)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000,8000", help="address-book sizes (comma separated)")
    ap.add_argument("--calendar", default="", help="calendar sizes (comma separated), e.g. 50000")
    ap.add_argument("--reps", type=int, default=15, help="repetitions of each timed operation")
    ap.add_argument("--only", choices=["ours", "stock"])
    ap.add_argument("--stock-max", type=int, default=0, help="no stock run above this size (0: no limit)")
    ap.add_argument("--json-out", help="all figures as JSON (bench/results/ is git-ignored)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory")
    args = ap.parse_args()
    import bcrypt

    state = Path(tempfile.mkdtemp(prefix="icscale-"))
    cafile, chain, key = make_certificates(state / "cert")
    line = f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
    sides: dict[str, Any] = {}
    if args.only != "stock":
        sides["ours"] = Ours(state / "ours", chain, key, line)
    if args.only != "ours":
        sides["stock"] = StockSide(state / "stock", state / "cert", line)
    names = list(sides)
    plans = [(Kind(False), [int(x) for x in args.sizes.split(",") if x])]
    if args.calendar:
        plans.append((Kind(True), [int(x) for x in args.calendar.split(",") if x]))
    out: list[str] = [f"scale_bench ({dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, reps {args.reps}, "
                      "wall time in ms unless marked (s), p50)", ""]
    results: dict[str, Any] = {}
    failed = False
    t0 = time.monotonic()
    try:
        turn = 0
        for kind, sizes in plans:
            res: dict[str, dict[int, dict[str, float]]] = {s: {} for s in names}
            for n in sizes:
                store = state / f"store-{kind.tag}-{n}"
                log(f"writing {n} {kind.label}")
                uids = write_store(store, kind, n)
                order = names if turn % 2 == 0 else names[::-1]
                turn += 1
                for s in order:
                    log(f"N={n} {kind.label}: {s}")
                    if s == "stock" and 0 < args.stock_max < n:
                        log(f"  stock skipped at N={n} (--stock-max {args.stock_max})")
                        res[s][n] = {k: float("nan") for k, _, _ in OPS}
                        continue
                    try:
                        res[s][n] = run_side(sides[s], store, kind, uids, args.reps, str(cafile))
                    except BenchError as exc:
                        log(f"FAILED: {exc}")
                        failed = True
                        res[s][n] = {k: float("nan") for k, _, _ in OPS}
                    log(f"  {s}: " + ", ".join(f"{k} {v:.1f}" for k, v in res[s][n].items()))
                shutil.rmtree(store)
            out += table(f"{kind.label}, N = {', '.join(map(str, sizes))}" +
                         (" (ratio = ours/stock; b = growth exponent, t ~ N^b)" if len(names) == 2 else ""),
                         sizes, res, names) + [""]
            results[kind.tag] = {s: {str(n): v for n, v in r.items()} for s, r in res.items()}
    finally:
        for side in sides.values():
            if getattr(side, "proc", None) is not None:
                side.stop()
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    print("\n".join(out))
    print(f"(total {time.monotonic() - t0:.0f} s)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
