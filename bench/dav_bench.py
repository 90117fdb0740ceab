#!/usr/bin/env python3
"""DAV benchmark: ``inverse-cloud serve`` against the seed laptop side, interleaved.

    .venv/bin/python bench/dav_bench.py --n 1000 --rounds 3     # the documented run (~6 min on 2 cores)
    .venv/bin/python bench/dav_bench.py --quick                 # n=50, 1 round (~15 s): a smoke run

Both servers run on loopback with the SAME certificate (a throwaway CA -> intermediate -> leaf for
laptop.test, verified by the client against the CA) and the SAME htpasswd line (user, password and
bcrypt cost; default cost 5, what ``htpasswd -B`` writes):

  (a) ours: ``inverse-cloud serve`` from ``tests.support.init_instance`` + ``ServeProcess``;
  (b) seed: standalone Radicale (its own server) behind nginx, started by bench/seed-stack/infra/
      radicale.sh and nginx.sh exactly as the seed stack configures them (Radicale defaults: no login
      cache, INFO logging; nginx: Debian defaults, access log, worker_processes auto).

Radicale's ``_filesystem_fsync`` is left at its default (True) on both sides: a config file cannot set
it (Radicale refuses hidden options there) and the bench refuses to run if our side overrides it.

Each round runs the DAVx5-like workload of bench/seed-stack/workload/carddav_bench.py (its vCard
generator, same seed) against both servers, alternating which goes first: MKCOL, N PUTs one at a time,
PROPFIND Depth 1 + addressbook-multiget in batches of 100 (the full sync), sync-collection initial and
no-change, then sequential GETs on one keep-alive connection (p50/p95); the address book is deleted at
the end of the round. It prints each timing, the ratio ours/seed per phase (median over rounds), and
RSS/PSS of our process against radicale + nginx (master + workers) after the workload. Nothing is
asserted about timings; the exit code is non-zero only if a workload check failed (a lost card, a
non-empty no-change sync) or a server did not start.

``run_workload(base_url, user, password, cafile, n, resolve=...)`` is the workload alone, for other
benches (e.g. through the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

HERE = Path(__file__).resolve().parent
SEED = HERE / "seed-stack"
REPO = HERE.parent
sys.path.insert(0, str(SEED / "workload"))
sys.path.insert(0, str(REPO))

from carddav_bench import CARD, DAV, StaticResolver, lat_summary, make_vcard, multistatus  # noqa: E402
from rss import mem  # noqa: E402

from tests.support import ServeProcess, free_port, init_instance  # noqa: E402

__all__ = ["run_workload", "run_workload_async"]

HOST = "laptop.test"
SETTLE_S = 3.0
USER = "bench"
PASSWORD = "bench-password"
XML_HDR = {"Content-Type": "application/xml; charset=utf-8"}


def log(msg: str) -> None:
    print(f"[dav_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the workload -----------------------------------------------------------------------------------

class _Fail(Exception):
    pass


async def _req(s: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    t0 = time.perf_counter()
    async with s.request(method, url, data=body, headers=headers or {}, allow_redirects=False) as r:
        data = await r.read()
        return r.status, data, time.perf_counter() - t0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes so far, exited threads included (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _expect(what: str, status: int, ok: tuple[int, ...], data: bytes) -> None:
    if status not in ok:
        raise _Fail(f"{what} -> {status}: {data[:200]!r}")


async def run_workload_async(base_url: str, user: str, password: str, cafile: str | None, n: int, *,
                             resolve: dict[str, str] | None = None, book: str | None = None,
                             multiget_batch: int = 100, get_samples: int = 200, photo_ratio: float = 0.1,
                             photo_bytes: int = 15000, seed: int = 42, request_timeout_s: float = 120,
                             max_phase_s: float = 600, cleanup: bool = True,
                             progress: Callable[[str], None] | None = None,
                             cpu_pids: Callable[[], Sequence[int]] | None = None) -> dict[str, Any]:
    """One DAVx5-like run against ``base_url`` (the DAV root, e.g. ``https://laptop.test:8443/radicale/``).

    All requests go over one keep-alive connection with preemptive Basic auth, as DAVx5 does.
    ``resolve`` maps host names to addresses (like ``curl --resolve``); SNI and the certificate check
    still use the name. Returns flat timings (``*_s``, ``*_ms``), ``ok`` and ``checks``; with ``cpu_pids``
    (the server's processes, asked before each phase) also the CPU seconds they used per phase
    (``cpu_*_s``): a figure that other load on the machine disturbs much less than wall time.
    """
    say = progress or (lambda _m: None)
    base = base_url if base_url.endswith("/") else base_url + "/"
    ssl_ctx: ssl.SSLContext | bool = False
    if urlsplit(base).scheme == "https":
        ssl_ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    import base64

    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    book_url = urljoin(base, f"{quote(user)}/{quote(book or f'bench-{n}-{uuid.uuid4().hex[:8]}')}/")
    book_path = urlsplit(book_url).path
    rng = random.Random(seed)
    photo_every = max(1, round(1 / photo_ratio)) if photo_ratio > 0 else 0
    cards = [make_vcard(i, rng, photo_bytes if photo_every and i % photo_every == 0 else 0) for i in range(n)]
    out: dict[str, Any] = {"n": n, "book_url": book_url}
    cpu_mark: list[float] = [0.0]

    def cpu_start() -> None:
        if cpu_pids is not None:
            cpu_mark[0] = cpu_seconds(cpu_pids())

    def cpu_end(phase: str) -> None:
        if cpu_pids is not None:
            out[f"cpu_{phase}_s"] = cpu_seconds(cpu_pids()) - cpu_mark[0]
    checks: dict[str, bool] = {}
    conn = aiohttp.TCPConnector(limit=1, ssl=ssl_ctx, resolver=StaticResolver(dict(resolve or {})),
                                keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=request_timeout_s),
                                     headers={"User-Agent": "inverse-cloud-bench/1 (DAVx5-like)",
                                              "Authorization": auth}) as s:
        # Discovery (connection set-up, TLS handshake, first login): timed, for information.
        body = (b'<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:" '
                b'xmlns:card="urn:ietf:params:xml:ns:carddav"><d:prop><d:current-user-principal/>'
                b'<card:addressbook-home-set/></d:prop></d:propfind>')
        st, data, dt_s = await _req(s, "PROPFIND", base, body, {**XML_HDR, "Depth": "0"})
        _expect("PROPFIND discovery", st, (207,), data)
        out["discovery_ms"] = dt_s * 1000

        body = ('<?xml version="1.0" encoding="utf-8"?><d:mkcol xmlns:d="DAV:" '
                'xmlns:card="urn:ietf:params:xml:ns:carddav"><d:set><d:prop><d:resourcetype>'
                '<d:collection/><card:addressbook/></d:resourcetype>'
                f'<d:displayname>bench {n}</d:displayname></d:prop></d:set></d:mkcol>').encode()
        st, data, dt_s = await _req(s, "MKCOL", book_url, body, XML_HDR)
        _expect("MKCOL", st, (200, 201), data)
        out["mkcol_ms"] = dt_s * 1000

        # Upload: one PUT at a time, as a phone does after a first import.
        say(f"PUT {n} cards")
        lat: list[float] = []
        deadline = time.monotonic() + max_phase_s
        cpu_start()
        t0 = time.perf_counter()
        for uid, vcard in cards:
            if time.monotonic() > deadline:
                raise _Fail(f"PUT phase over {max_phase_s:.0f} s after {len(lat)} cards")
            st, data, dt_s = await _req(s, "PUT", urljoin(base, f"{book_path}{uid}.vcf"), vcard.encode(),
                                        {"Content-Type": "text/vcard; charset=utf-8", "If-None-Match": "*"})
            _expect("PUT", st, (200, 201, 204), data)
            lat.append(dt_s)
        out["put_s"] = time.perf_counter() - t0
        cpu_end("put")
        summary = lat_summary(lat)
        out["put_p50_ms"], out["put_p95_ms"] = summary["p50_ms"], summary["p95_ms"]
        # Radicale's per-PUT cost grows with the collection (it checks the UID against every item).
        out["put_last100_mean_ms"] = statistics.fmean(lat[-100:]) * 1000 if lat else 0.0

        # Full sync: PROPFIND Depth 1, then addressbook-multiget in batches.
        say("full sync")
        body = (b'<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop>'
                b'<d:resourcetype/><d:getetag/><d:getcontenttype/></d:prop></d:propfind>')
        cpu_start()
        st, data, dt_s = await _req(s, "PROPFIND", book_url, body, {**XML_HDR, "Depth": "1"})
        cpu_end("propfind")
        _expect("PROPFIND Depth 1", st, (207,), data)
        out["propfind_s"] = dt_s
        hrefs = [h for r in multistatus(data) if (h := r.findtext(f"{{{DAV}}}href") or "").rstrip("/")
                 != book_path.rstrip("/")]
        checks["propfind_lists_all"] = len(hrefs) == n
        got = 0
        cpu_start()
        t0 = time.perf_counter()
        for i in range(0, len(hrefs), multiget_batch):
            body = ('<?xml version="1.0" encoding="utf-8"?><card:addressbook-multiget xmlns:d="DAV:" '
                    'xmlns:card="urn:ietf:params:xml:ns:carddav"><d:prop><d:getetag/><card:address-data/>'
                    '</d:prop>' + "".join(f"<d:href>{h}</d:href>" for h in hrefs[i:i + multiget_batch])
                    + '</card:addressbook-multiget>').encode()
            st, data, _ = await _req(s, "REPORT", book_url, body, {**XML_HDR, "Depth": "1"})
            _expect("addressbook-multiget", st, (207,), data)
            got += sum(1 for r in multistatus(data) if r.find(f".//{{{CARD}}}address-data") is not None)
        out["multiget_s"] = time.perf_counter() - t0
        cpu_end("multiget")
        out["full_sync_s"] = out["propfind_s"] + out["multiget_s"]
        checks["multiget_returns_all"] = got == n

        # sync-collection (RFC 6578): initial, then with the token (nothing changed).
        say("sync-collection")
        tokens: list[str] = []
        for name, token in (("initial", ""), ("nochange", None)):
            tok = token if token is not None else tokens[0]
            body = ('<?xml version="1.0" encoding="utf-8"?><d:sync-collection xmlns:d="DAV:">'
                    f'<d:sync-token>{tok}</d:sync-token><d:sync-level>1</d:sync-level>'
                    '<d:prop><d:getetag/></d:prop></d:sync-collection>').encode()
            cpu_start()
            st, data, dt_s = await _req(s, "REPORT", book_url, body, {**XML_HDR, "Depth": "0"})
            cpu_end(f"sync_{name}")
            _expect(f"sync-collection {name}", st, (207,), data)
            responses = multistatus(data)
            tokens.append(ET.fromstring(data).findtext(f"{{{DAV}}}sync-token") or "")  # noqa: S314 (our server)
            out[f"sync_{name}_s"] = dt_s
            checks[f"sync_{name}_count"] = len(responses) == (n if name == "initial" else 0)

        # Single GETs on the warm connection.
        say(f"{get_samples} GETs")
        grng = random.Random(seed + 1)
        lat = []
        deadline = time.monotonic() + max_phase_s
        cpu_start()
        for _ in range(get_samples):
            if time.monotonic() > deadline:
                break
            st, data, dt_s = await _req(s, "GET", urljoin(base, grng.choice(hrefs)))
            _expect("GET", st, (200,), data)
            lat.append(dt_s)
        cpu_end("get")
        if cpu_pids is not None and lat:
            out["cpu_get_per_req_ms"] = out.pop("cpu_get_s") / len(lat) * 1000
        summary = lat_summary(lat)
        out["get_p50_ms"], out["get_p95_ms"] = summary["p50_ms"], summary["p95_ms"]

        if cleanup:
            st, data, dt_s = await _req(s, "DELETE", book_url)
            _expect("DELETE book", st, (200, 204), data)
            out["delete_book_ms"] = dt_s * 1000
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


def run_workload(base_url: str, user: str, password: str, cafile: str | None, n: int, *,
                 resolve: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    """Blocking wrapper of :func:`run_workload_async` (its own event loop)."""
    return asyncio.run(run_workload_async(base_url, user, password, cafile, n, resolve=resolve, **kw))


# --- the two servers --------------------------------------------------------------------------------

def make_certificates(d: Path) -> tuple[Path, bytes, bytes]:
    """A throwaway CA -> intermediate -> leaf for HOST (ECDSA P-256, like Let's Encrypt's E-chain).
    Returns (CA file for the client, fullchain PEM, key PEM); also writes fullchain.pem/privkey.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return b.sign(issuer_key, hashes.SHA256())

    root_key, int_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert("bench root", root_key, "bench root", root_key, True)
    inter = cert("bench intermediate", int_key, "bench root", root_key, True)
    leaf = cert(HOST, leaf_key, "bench intermediate", int_key, False)
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + inter.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    d.mkdir(parents=True, exist_ok=True)
    (d / "root.pem").write_bytes(root.public_bytes(pem))
    (d / "fullchain.pem").write_bytes(chain)
    (d / "privkey.pem").write_bytes(key)
    os.chmod(d / "privkey.pem", 0o600)   # read by nginx's master (root), never by its workers
    return d / "root.pem", chain, key


class SeedSide:
    """Standalone Radicale behind nginx, started and stopped by the seed-stack scripts (by pid file)."""

    label = "seed"

    def __init__(self, state: Path, cert_dir: Path, bcrypt_rounds: int) -> None:
        self.state = state
        self.env = {**os.environ, "BENCH_STATE": str(state), "PY": sys.executable, "HOST_NAME": HOST,
                    "RADICALE_PORT": str(free_port()), "NGINX_HTTP_PORT": str(free_port()),
                    "NGINX_HTTPS_PORT": str(free_port()), "CERT_DIR": str(cert_dir), "RADICALE_USER": USER,
                    "RADICALE_PASSWORD": PASSWORD, "BCRYPT_ROUNDS": str(bcrypt_rounds)}
        self.started: list[str] = []

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.env['NGINX_HTTPS_PORT']}/radicale/"

    def _script(self, name: str, action: str) -> None:
        p = subprocess.run([str(SEED / "infra" / name), action], env=self.env, capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"{name} {action} failed: {(p.stdout + p.stderr).strip()[-800:]}")
        if p.stdout.strip():
            log(p.stdout.strip())

    def start(self) -> None:
        for name in ("radicale.sh", "nginx.sh"):
            self.started.append(name)
            self._script(name, "start")

    def stop(self) -> None:
        while self.started:
            name = self.started.pop()
            try:
                self._script(name, "stop")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"stopping {name}: {exc}")

    def htpasswd_line(self) -> str:
        return (self.state / "radicale" / "users").read_text()

    def pids(self) -> dict[str, list[int]]:
        radicale = int((self.state / "radicale" / "radicale.pid").read_text())
        master = int((self.state / "nginx" / "master.pid").read_text())
        kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return {"radicale": [radicale], "nginx_master": [master], "nginx_workers": [int(k) for k in kids]}


class OurSide:
    """``inverse-cloud serve`` in a child process, with the bench certificate and user line."""

    label = "ours"

    def __init__(self, root: Path, chain: bytes, key: bytes, htpasswd_line: str, extra_toml: str,
                 env: dict[str, str], radicale_opts: Sequence[str] = (), with_components: bool = False) -> None:
        from inverse_cloud.certs.store import CertStore
        from inverse_cloud.config import load
        from inverse_cloud.dav.radicale_app import radicale_options

        kw: dict[str, str] = {}
        if with_components:
            kw = {"relay": f"bench@127.0.0.1:{free_port()}", "acme_directory": f"https://127.0.0.1:{free_port()}/dir"}
        self.config = init_instance(root, domain=HOST, user=USER, password=PASSWORD, extra_toml=extra_toml, **kw)
        if with_components:
            import asyncssh

            host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            text = self.config.read_text().replace('host_key = ""', f'host_key = "{host_key}"', 1)
            self.config.write_text(text)
        tables: dict[str, list[str]] = {}
        for opt in radicale_opts:
            name, _, value = opt.partition("=")
            section, _, key_name = name.partition(".")
            tables.setdefault(section, []).append(f"{key_name} = {json.dumps(value)}")
        with open(self.config, "a") as f:
            for section, lines in tables.items():
                f.write(f"\n[radicale.{section}]\n" + "\n".join(lines) + "\n")
        cfg = load(self.config)
        if "_filesystem_fsync" in radicale_options(cfg).get("storage", {}):
            raise SystemExit("our config overrides Radicale's _filesystem_fsync: the comparison would be unfair")
        # Same bcrypt hash as the seed side (same cost, same salt).
        cfg.server.htpasswd_path.write_text(htpasswd_line)
        CertStore(cfg.server.cert_dir).save(chain, key)
        self.port = cfg.server.https_listen[1]
        self.proc = ServeProcess(self.config, env=env)

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.port}/radicale/"

    def start(self) -> None:
        self.proc.start()
        log(f"inverse-cloud serve pid={self.proc.pid} https=127.0.0.1:{self.port}")
        if "self-signed" in self.proc.log():
            raise RuntimeError("our server serves its self-signed certificate, not the bench one:\n" + self.proc.log())

    def stop(self) -> None:
        code = self.proc.stop()
        log(f"inverse-cloud serve stopped (exit {code})")

    def pids(self) -> dict[str, list[int]]:
        return {"inverse_cloud": [self.proc.pid]}


def _status_mib(pid: int, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory(pids: dict[str, list[int]]) -> dict[str, Any]:
    """RSS and PSS (seed-stack/workload/rss.py), plus the anonymous part of RSS (the heap: what
    imports and requests leave behind; the rest is shared libraries and mapped files)."""
    out: dict[str, Any] = {"rss_mib": 0.0, "pss_mib": 0.0, "anon_mib": 0.0, "groups": {}}
    for group, ps in pids.items():
        ms = [mem(p) for p in ps]
        g = {"pids": ps, "rss_mib": sum(m["rss_mib"] for m in ms), "pss_mib": sum(m["pss_mib"] for m in ms),
             "anon_mib": sum(_status_mib(p, "RssAnon") for p in ps)}
        out["groups"][group] = g
        for k in ("rss_mib", "pss_mib", "anon_mib"):
            out[k] += g[k]
    return out


def threads_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


# --- report ---------------------------------------------------------------------------------------

PHASES = [
    ("put_s", "upload N vCards, one PUT at a time", "s"),
    ("put_p50_ms", "  PUT p50", "ms"),
    ("put_last100_mean_ms", "  PUT mean of the last 100", "ms"),
    ("propfind_s", "PROPFIND Depth 1", "s"),
    ("multiget_s", "addressbook-multiget (all batches)", "s"),
    ("full_sync_s", "full sync (PROPFIND + multiget)", "s"),
    ("sync_initial_s", "sync-collection initial", "s"),
    ("sync_nochange_s", "sync-collection no change", "s"),
    ("get_p50_ms", "GET p50", "ms"),
    ("get_p95_ms", "GET p95", "ms"),
]
CPU_PHASES = [
    ("cpu_put_s", "upload (all PUTs)", "s"),
    ("cpu_propfind_s", "PROPFIND Depth 1", "s"),
    ("cpu_multiget_s", "addressbook-multiget", "s"),
    ("cpu_sync_initial_s", "sync-collection initial", "s"),
    ("cpu_sync_nochange_s", "sync-collection no change", "s"),
    ("cpu_get_per_req_ms", "one GET", "ms"),
]


def _fmt(value: float, unit: str) -> str:
    return f"{value * 1000:.1f} ms" if unit == "s" and value < 1 else (
        f"{value:.2f} s" if unit == "s" else f"{value:.2f} ms")


def report(results: dict[str, list[dict[str, Any]]], mem_now: dict[str, dict[str, Any]],
           mem_after: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [f"dav_bench n={args.n} rounds={args.rounds} ({dt.datetime.now():%Y-%m-%d %H:%M}, "
             f"{os.cpu_count()} CPUs, bcrypt cost {args.bcrypt_rounds}, fsync on both sides"
             f"{', ours with relay + ACME configured' if args.with_components else ''})", ""]
    for title, phases in (("wall time", PHASES), ("server CPU (ours: 1 process; seed: radicale+nginx)", CPU_PHASES)):
        lines.append(f"{title:38} {'ours (median)':>14} {'seed (median)':>14} {'ratio':>6}   ours/seed per round")
        for key, name, unit in phases:
            ours = [r[key] for r in results["ours"]]
            seed = [r[key] for r in results["seed"]]
            mo, ms = statistics.median(ours), statistics.median(seed)
            ratio = mo / ms if ms else float("nan")
            per = " ".join(f"{_fmt(a, unit)}/{_fmt(b, unit)}" for a, b in zip(ours, seed, strict=True))
            lines.append(f"{name:38} {_fmt(mo, unit):>14} {_fmt(ms, unit):>14} {ratio:6.2f}   {per}")
        lines.append("")
    for when, mem_set in ((f"{SETTLE_S:.0f} s after the workload", mem_after), ("at the last response", mem_now)):
        o, s = mem_set["ours"], mem_set["seed"]
        lines.append(f"memory {when}, MiB RSS/PSS/anon: ours {o['rss_mib']:.1f}/{o['pss_mib']:.1f}/{o['anon_mib']:.1f}"
                     f" vs seed {s['rss_mib']:.1f}/{s['pss_mib']:.1f}/{s['anon_mib']:.1f} = "
                     + ", ".join(f"{g} {v['rss_mib']:.1f}/{v['pss_mib']:.1f}/{v['anon_mib']:.1f}"
                                 for g, v in s["groups"].items()))
    o, s = mem_after["ours"], mem_after["seed"]
    lines.append(f"peak RSS: ours {o['peak_rss_mib']:.1f} MiB ({o['threads']} threads), seed radicale "
                 f"{s['peak_rss_mib']:.1f} MiB ({s['threads']} threads)")
    lines.append("target: every ratio <= 1.00; our RSS < 75 MiB (the seed laptop side incl. autossh+ssh)")
    return lines


# --- main -------------------------------------------------------------------------------------------

def write_json(path: str, args: argparse.Namespace, **figures: Any) -> None:
    """All figures of a run, with its arguments and date (``--json-out``; bench/results/ is git-ignored)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    doc = {"args": vars(args), "date": dt.datetime.now().isoformat(timespec="seconds"), **figures}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="vCards per round (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs both servers, order alternating")
    ap.add_argument("--quick", action="store_true", help="n=50, 1 round, 50 GETs: a smoke run")
    ap.add_argument("--get-samples", type=int, default=200)
    ap.add_argument("--bcrypt-rounds", type=int, default=5, help="bcrypt cost of the shared user (htpasswd -B: 5)")
    ap.add_argument("--only", choices=["ours", "seed"], help="run one side only (profiling)")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V",
                    help="environment for our server process (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--extra-toml", default="", help="lines appended to our [server] table")
    ap.add_argument("--with-components", action="store_true",
                    help="configure a relay (pinned key, nothing listening: the tunnel retries) and ACME (a CA "
                         "that does not answer) on our side, so the process carries every component's imports, "
                         "as a real installation does")
    ap.add_argument("--radicale-option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a Radicale option for our side ([radicale.SECTION] in its config), e.g. "
                         "storage.use_mtime_and_size_for_item_cache=False")
    ap.add_argument("--state", help="state directory (default: a fresh one under /tmp, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs, storage)")
    ap.add_argument("--json-out", help="write all figures as JSON here (bench/results/ is git-ignored)")
    ap.add_argument("--max-phase-s", type=float, default=600)
    ap.add_argument("--py-spy", metavar="OUT", help="sample our server with py-spy (on PATH) into OUT (raw "
                    "collapsed stacks, all threads, idle included): see bench/stacks.py")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.get_samples = 50, 1, 50
    if shutil.which("nginx") is None and args.only != "ours":
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 2

    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="icbench-"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)   # nginx workers (www-data) traverse it to their temp files
    cafile, chain, key = make_certificates(state / "cert")
    env = dict(kv.split("=", 1) for kv in args.server_env)
    sides: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "seed": []}
    mem_idle: dict[str, dict[str, Any]] = {}
    mem_after: dict[str, dict[str, Any]] = {}
    mem_now: dict[str, dict[str, Any]] = {}
    failed = False
    spy: subprocess.Popen[bytes] | None = None
    t_start = time.monotonic()
    try:
        seed = SeedSide(state / "seed", state / "cert", args.bcrypt_rounds)
        sides["seed"] = seed
        seed.start()
        ours = OurSide(state / "ours", chain, key, seed.htpasswd_line(), args.extra_toml, env, args.radicale_option,
                       args.with_components)
        sides["ours"] = ours
        ours.start()
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(ours.proc.pid), "--format", "raw", "--threads",
                                    "--idle", "--rate", "250", "-o", args.py_spy], stdout=subprocess.DEVNULL)
        if args.only:
            sides[{"ours": "seed", "seed": "ours"}[args.only]].stop()
        active = [args.only] if args.only else ["ours", "seed"]
        for name in active:
            mem_idle[name] = memory(sides[name].pids())
        for r in range(args.rounds):
            order = active if r % 2 == 0 else active[::-1]
            for name in order:
                side = sides[name]
                log(f"round {r + 1}/{args.rounds}: {name} ({side.base_url})")
                res = run_workload(side.base_url, USER, PASSWORD, str(cafile), args.n, resolve={HOST: "127.0.0.1"},
                                   book=f"bench-{name}-{r}", get_samples=args.get_samples,
                                   max_phase_s=args.max_phase_s, progress=lambda m, _n=name: log(f"  {_n}: {m}"),
                                   cpu_pids=lambda _s=side: [p for ps in _s.pids().values() for p in ps])
                res["round"], res["order"] = r, order.index(name)
                results[name].append(res)
                failed |= not res["ok"]
                log(f"  {name}: PUT {res['put_s']:.2f} s, full sync {res['full_sync_s'] * 1000:.0f} ms, "
                    f"sync no-change {res['sync_nochange_s'] * 1000:.1f} ms, GET p50 {res['get_p50_ms']:.2f} ms"
                    + ("" if res["ok"] else f"  CHECK FAILED {res['checks']}"))
        for name in active:
            mem_now[name] = memory(sides[name].pids())
        # Memory of a server that has been idle for a moment after the sync (what a laptop carries between
        # syncs). The wait is the measured condition, not a wait for a server to become ready.
        time.sleep(SETTLE_S)
        for name in active:
            pids = sides[name].pids()
            mem_after[name] = memory(pids)
            main_pid = pids[next(iter(pids))][0]
            mem_after[name]["threads"] = threads_of(main_pid)
            mem_after[name]["peak_rss_mib"] = _status_mib(main_pid, "VmHWM")
    finally:
        for side in list(sides.values())[::-1]:
            side.stop()   # py-spy ends with its target
        if spy is not None:
            spy.wait(30)
    elapsed = time.monotonic() - t_start
    if args.only:
        print(json.dumps({"results": results[args.only], "memory_after": mem_after, "memory_at_end": mem_now},
                         indent=1))
    else:
        print("\n".join(report(results, mem_now, mem_after, args)))
    print(f"\n(total {elapsed:.0f} s; state {state}{'' if args.keep or args.state else ' removed'})")
    if args.json_out:
        write_json(args.json_out, args, results=results, memory_idle=mem_idle, memory_at_end=mem_now,
                   memory_after=mem_after, elapsed_s=elapsed)
    if not (args.keep or args.state):
        shutil.rmtree(state, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
