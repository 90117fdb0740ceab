#!/usr/bin/env python3
"""Memory benchmark: what the one ``inverse-cloud serve`` process holds against the seed stack's laptop side,
after the same workload through a real relay, in one run. Printed, never asserted.

    flock /tmp/ic-integration.lock .venv/bin/python bench/memory_bench.py             # the documented run
    flock /tmp/ic-integration.lock .venv/bin/python bench/memory_bench.py --quick     # 100 cards, 500 items
    ... bench/memory_bench.py --only ours --server-env MALLOC_ARENA_MAX=1            # one lever, ours only

Root (the relay's tunnel user; nginx, autossh, sshd installed). Two laptop sides, each behind its own real sshd
relay (as in tunnel_bench.py):

  seed: Radicale's own server behind nginx (seed-stack/infra/radicale.sh, nginx.sh) and autossh + ssh -R
        (tunnel.sh) to relay-sshd.sh;
  ours: ``inverse-cloud serve`` with its tunnel to a relay-setup sshd (integration/relay_sshd.py) and ACME
        configured (a valid certificate is in place, so no order is due; the directory and the CAA name server
        are dead loopback ports, so the renewal-info and CAA look-ups run and fail without leaving the host).

Both start with one collection of --items vCards already in their storage folder (scale_bench.write_store)
and answer one sync-collection on it (the cold first request: every item parsed once; ours builds and
persists its index, Radicale its item cache files). Then the laptop side's DAV server restarts and answers
the same sync again (ours: its index loaded, stat only), the steady state of a laptop that has served the
collection before; --cold skips the restart and measures right after the cold parse. Then the --cards DAVx5-like workload (dav_bench.run_workload) runs through each
relay, and --settle-s later (a laptop between syncs; ours trims the heap after 2 s idle) this prints RSS, PSS
and anonymous memory per process (/proc/PID/smaps_rollup and status), the ratio ours/seed, and our threads.

Unless --no-analyse, a second run of ours alone (same config and store, same workload) with PYTHONTRACEMALLOC
and PYTHONPROFILEIMPORTTIME prints the costliest imports at ready time (cumulative microseconds, from the
serve log), tracemalloc's top allocators after start (by file:line) and what the workload added (snapshot
difference). That run's process is slower and bigger (tracemalloc's own bookkeeping): its figures explain,
the first run's figures are the measurement.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, REPO / "integration", HERE / "seed-stack" / "workload", HERE):
    sys.path.insert(0, str(p))

from dav_bench import HOST, PASSWORD, USER, make_certificates, memory, run_workload  # noqa: E402
from relay_sshd import configure, relay_sshd  # noqa: E402
from scale_bench import BOOK, Kind, write_store  # noqa: E402
from tunnel_bench import OurTunnel, Phone, SeedTunnel  # noqa: E402

from tests.support import ServeProcess, free_port, wait_until  # noqa: E402


def log(msg: str) -> None:
    print(f"[memory_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class OurRelayAcme(OurTunnel):
    """Ours with the relay and ACME configured (tunnel_bench's side has ACME off)."""

    def __init__(self, root: Path, chain: bytes, key: bytes, htpasswd_line: str, env: dict[str, str],
                 direct: bool = False) -> None:
        super().__init__(root, chain, key, htpasswd_line)
        configure(self.config, "acme", enabled=True, directory=f"https://127.0.0.1:{free_port()}/dir",
                  caa_issuer="letsencrypt.org", dns_server=f"127.0.0.1:{free_port()}")
        self.env = env
        self.direct = direct
        if direct:  # the relay stays configured (a pinned host key, nothing listening): the tunnel retries
            import asyncssh

            host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            configure(self.config, "relay", host_key=host_key)

    @property
    def base_url(self) -> str:
        if self.direct:
            return f"https://{HOST}:{self.https_port}/radicale/"
        return super().base_url

    def start(self) -> None:
        if self.direct:
            self.srv = ServeProcess(self.config, env=self.env).start(timeout_s=120)
            log(f"inverse-cloud serve pid={self.srv.pid} (direct: no relay listening)")
            return
        self._relay_cm = relay_sshd(self.config, user="icbench", client_alive_interval=15, client_alive_count_max=3)
        self.relay = self._relay_cm.__enter__()
        self.srv = ServeProcess(self.config, env=self.env).start(timeout_s=120)
        self.relay.wait_forwards(60, on_timeout=self.srv.log)
        log(f"inverse-cloud serve pid={self.srv.pid}, relay sshd pid={self.relay.pid}")

    def restart_serve(self) -> None:
        self.stop_serve()
        if self.direct:
            self.srv = ServeProcess(self.config, env=self.env).start(timeout_s=120)
            return
        wait_until(lambda: not self.relay.forwards_bound(), 60, "our forwards released")
        self.srv = ServeProcess(self.config, env=self.env).start(timeout_s=120)
        self.relay.wait_forwards(60, on_timeout=self.srv.log)
        log(f"inverse-cloud serve restarted, pid={self.srv.pid}")

    @property
    def storage_dir(self) -> Path:
        from inverse_cloud.config import load

        return load(self.config).server.storage_dir


def smaps(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        if v.strip().endswith("kB"):
            out[k] = int(v.split()[0]) / 1024
    return out


def thread_names(pid: int) -> list[str]:
    names = []
    for t in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            names.append(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip())
        except OSError:
            continue
    return names


def load_index(port: int, cafile: Path | None, what: str, prefix: str = "/radicale") -> float:
    """One initial sync-collection of the big collection: ours over HTTPS; the seed straight to Radicale's
    plain-HTTP port (its first request on a cold store outlasts nginx's 60 s proxy timeout)."""
    body = (b'<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token/><d:sync-level>1</d:sync-level>'
            b'<d:prop><d:getetag/></d:prop></d:sync-collection>')
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    if cafile is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    else:
        ctx = ssl.create_default_context(cafile=str(cafile))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=1800, context=ctx)
        ctx.check_hostname = False  # the certificate names HOST; the bench connects to 127.0.0.1
    t0 = time.monotonic()
    try:
        conn.request("REPORT", f"{prefix}/{USER}/{BOOK}/", body=body, headers={
            "Authorization": auth, "Depth": "1", "Content-Type": "application/xml; charset=utf-8"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    n = len(re.findall(rb"<(?:\w+:)?response[ >]", data))
    if r.status != 207:
        raise RuntimeError(f"{what}: initial sync -> {r.status}: {data[:300]!r}")
    log(f"{what}: initial sync of the {BOOK!r} collection: {n} items in {time.monotonic() - t0:.1f} s")
    return time.monotonic() - t0


def workload(side: Any, cafile: Path, cards: int, tag: str) -> dict[str, Any]:
    w = run_workload(side.base_url, USER, PASSWORD, str(cafile), cards, resolve={HOST: "127.0.0.1"},
                     book=f"mb-{tag}", get_samples=100)
    log(f"{tag}: {cards}-card workload: PUT {w['put_s']:.1f} s, full sync "
        f"{w['full_sync_s'] * 1000:.0f} ms, ok={w['ok']}")
    return w


def importtime_top(log_text: str, n: int) -> list[str]:
    rows = []
    for line in log_text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    top = [r for r in rows if r[1] <= 3]
    top.sort(reverse=True)
    return [f"  {us / 1000:8.1f} ms  {name}" for us, _depth, name in top[:n]] + [
        f"  ({len(rows)} modules imported by ready time and after)"]


def tm_lines(stats: list[Any], n: int, diff: bool = False) -> list[str]:
    out = []
    for st in stats[:n]:
        fr = st.traceback[0]
        f = fr.filename
        f = f.split("site-packages/")[-1] if "site-packages/" in f else f.replace(str(REPO) + "/", "")
        size = st.size_diff if diff else st.size
        out.append(f"  {size / 2**20:+7.2f} MiB  {st.count_diff if diff else st.count:+8d} blocks  {f}:{fr.lineno}"
                   if diff else f"  {size / 2**20:7.2f} MiB  {st.count:8d} blocks  {f}:{fr.lineno}")
    return out


def tm_by_package(snap: tracemalloc.Snapshot, n: int) -> list[str]:
    tot: dict[str, int] = {}
    for st in snap.statistics("filename"):
        f = st.traceback[0].filename
        if "site-packages/" in f:
            key = f.split("site-packages/")[1].split("/")[0]
        elif "/inverse_cloud/" in f:
            key = "inverse_cloud"
        elif f.startswith("<frozen importlib"):
            key = "(code objects of imported modules: importlib)"
        elif "/lib/python3" in f:
            key = "stdlib"
        else:
            key = f
        tot[key] = tot.get(key, 0) + st.size
    rows = sorted(tot.items(), key=lambda kv: -kv[1])
    total = sum(tot.values())
    return [f"  {total / 2**20:7.2f} MiB traced in all"] + [f"  {v / 2**20:7.2f} MiB  {k}" for k, v in rows[:n]]


def analyse(root: Path, chain: bytes, key: bytes, htpasswd: str, store: Path, warm_store: Path, cafile: Path,
            args: Any, env: dict[str, str]) -> list[str]:
    fifo = root / "memprobe.fifo"
    os.mkfifo(fifo)
    probe_env = {**env, "PYTHONTRACEMALLOC": "1", "PYTHONPROFILEIMPORTTIME": "1",
                 "INVERSE_CLOUD_MEMPROBE": str(fifo),
                 "PYTHONPATH": os.pathsep.join([str(HERE / "memprobe"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    side = OurRelayAcme(root / "ours", chain, key, htpasswd, probe_env, direct=args.direct)
    if warm_store.exists():
        shutil.rmtree(side.storage_dir, ignore_errors=True)
        shutil.copytree(warm_store, side.storage_dir)
    else:
        _copy_store(store, side.storage_dir)
    lines = ["", "=== analysis run (ours alone, tracemalloc on: slower and bigger than the run above) ==="]
    try:
        side.start()
        assert side.srv is not None
        if args.items:
            load_index(side.https_port, cafile, "ours (analysis)")

        def snapshot(name: str) -> tracemalloc.Snapshot:
            out = root / f"{name}.tmsnap"
            with open(fifo, "w") as f:
                f.write(f"{out}\n")
            wait_until(lambda: Path(str(out) + ".done").exists(), 300, f"tracemalloc snapshot {name}")
            return tracemalloc.Snapshot.load(str(out))

        time.sleep(args.settle_s)  # the measured condition: a process at rest
        ready = snapshot("ready")
        workload(side, cafile, args.cards, "ours-analysis")
        time.sleep(args.settle_s)
        after = snapshot("after")
        lines += ["", "imports (cumulative, top-level and three levels below; -X importtime):"]
        lines += importtime_top(side.srv.log(), args.top)
        lines += ["", "tracemalloc after start, by package:"] + tm_by_package(ready, args.top)
        lines += ["", "tracemalloc after start, top lines:"] + tm_lines(ready.statistics("lineno"), args.top)
        lines += ["", "tracemalloc: what the workload left behind (after - ready), top lines:"]
        lines += tm_lines(after.compare_to(ready, "lineno"), args.top, diff=True)
        total_ready = sum(s.size for s in ready.statistics("filename"))
        total_after = sum(s.size for s in after.statistics("filename"))
        lines.append(f"  traced: {total_ready / 2**20:.2f} MiB after start, {total_after / 2**20:.2f} MiB after "
                     "the workload")
    finally:
        side.stop()
    return lines


def _copy_store(store: Path, storage_dir: Path) -> None:
    if not store.exists():
        return
    target = storage_dir / "collection-root" / USER
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(store / "collection-root" / USER, target)


def fmt_mem(m: dict[str, Any]) -> str:
    return f"{m['rss_mib']:6.1f} {m['pss_mib']:6.1f} {m['anon_mib']:6.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", type=int, default=1000, help="vCards in the workload through the relay (1000)")
    ap.add_argument("--items", type=int, default=10000, help="vCards in the collection loaded at start (10000)")
    ap.add_argument("--settle-s", type=float, default=5.0, help="seconds at rest before each measurement (5)")
    ap.add_argument("--only", choices=["ours", "seed"], help="one side only")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V", help="environment for ours")
    ap.add_argument("--no-analyse", action="store_true", help="skip the tracemalloc/importtime run")
    ap.add_argument("--top", type=int, default=15, help="lines per analysis table (15)")
    ap.add_argument("--cold", action="store_true",
                    help="measure right after the first request on the cold store (every item parsed once) "
                         "instead of after a restart on the built index and caches (the steady state)")
    ap.add_argument("--direct", action="store_true",
                    help="ours only, no relay: the relay stays configured (nothing listens, the tunnel retries) "
                         "and the workload goes straight to our HTTPS port; needs no sshd and no shared lock")
    ap.add_argument("--warm-store", metavar="DIR",
                    help="ours' built storage folder (items + index): reused if DIR exists (no cold parse), "
                         "else built once and kept there; for comparing levers quickly")
    ap.add_argument("--quick", action="store_true", help="100 cards, 500 items: a smoke run")
    ap.add_argument("--json-out", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.cards, args.items = 100, 500
    if args.direct:
        args.only = "ours"
    for tool in ("nginx", "autossh", "ssh", "/usr/sbin/sshd"):
        if shutil.which(tool) is None and not args.direct:
            print(f"{tool} is not installed (apt-get install nginx autossh openssh-server)", file=sys.stderr)
            return 2
    env = dict(kv.split("=", 1) for kv in args.server_env)
    state = Path(tempfile.mkdtemp(prefix="icmembench-"))
    state.chmod(0o755)  # noqa: S103 (nginx workers traverse it)
    cafile, chain, key = make_certificates(state / "cert")
    phone = Phone(cafile)
    store = state / "store"
    if args.items:
        log(f"writing {args.items} vCards")
        write_store(store, Kind(calendar=False), args.items)
    warm_store = state / "ours-warm"   # ours' storage folder with its index, for the analysis run
    res: dict[str, Any] = {}
    threads: list[str] = []
    rollup: dict[str, float] = {}
    seed: SeedTunnel | None = None
    ours: OurRelayAcme | None = None
    lines: list[str] = []
    try:
        seed = SeedTunnel(state / "seed", state / "cert")
        htpasswd = seed.side.htpasswd_line() if (state / "seed" / "radicale" / "users").exists() else ""
        if args.only != "ours":
            _copy_store(store, state / "seed" / "radicale" / "collections")
            seed.start()
            htpasswd = seed.side.htpasswd_line()
            if phone.wait_ok(seed.relay_https_port, 60, 0.2) is None:
                raise RuntimeError("seed: no working request through the relay")
            if args.items:
                load_index(int(seed.side.env["RADICALE_PORT"]), None, "seed", prefix="")
                if not args.cold:  # steady state: Radicale's item caches built, then a fresh process
                    seed.side._script("radicale.sh", "stop")
                    seed.side._script("radicale.sh", "start")
                    load_index(int(seed.side.env["RADICALE_PORT"]), None, "seed (after a restart)", prefix="")
            workload(seed, cafile, args.cards, "seed")
            time.sleep(args.settle_s)  # the measured condition: a laptop between syncs
            res["seed"] = memory(seed.pids())
            seed.stop()
            seed = None
        if args.only != "seed":
            if not htpasswd:
                import bcrypt

                htpasswd = f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n"
            ours = OurRelayAcme(state / "ours", chain, key, htpasswd, env, direct=args.direct)
            reuse = bool(args.warm_store) and Path(args.warm_store).exists() and not args.cold
            if reuse:
                shutil.rmtree(ours.storage_dir, ignore_errors=True)
                shutil.copytree(args.warm_store, ours.storage_dir)
            else:
                _copy_store(store, ours.storage_dir)
            ours.start()
            if not args.direct and phone.wait_ok(ours.relay_https_port, 60, 0.2) is None:
                raise RuntimeError("ours: no working request through the relay")
            assert ours.srv is not None
            if args.items and reuse:
                load_index(ours.https_port, cafile, "ours (built store from --warm-store)")
            elif args.items:
                load_index(ours.https_port, cafile, "ours")
                if args.warm_store and not args.cold:
                    ours.stop_serve()
                    shutil.copytree(ours.storage_dir, args.warm_store)
                    log(f"built store kept in {args.warm_store}")
                    ours.restart_serve()
                    load_index(ours.https_port, cafile, "ours (after a restart)")
                elif not args.cold:  # steady state: the index is built and persisted, then a fresh process
                    ours.restart_serve()
                    load_index(ours.https_port, cafile, "ours (after a restart)")
            workload(ours, cafile, args.cards, "ours")
            time.sleep(args.settle_s)
            res["ours"] = memory(ours.pids())
            threads = thread_names(ours.srv.pid)
            rollup = smaps(ours.srv.pid)
            ours.stop()
            if args.warm_store and Path(args.warm_store).exists():
                warm_store = Path(args.warm_store)
            elif args.items and not args.cold:
                shutil.copytree(ours.storage_dir, warm_store)
            ours = None
        lines += ["", f"=== memory bench: {args.cards} cards through the relay, a {args.items}-item collection "
                  f"loaded ({'cold store' if args.cold else 'after a restart'}), {args.settle_s:g} s at rest;"
                  + (" DIRECT (no relay listening)" if args.direct else "") + " ours with relay + ACME configured"
                  + (f", env {' '.join(args.server_env)}" if args.server_env else "") + " ===",
                  "", "                              RSS    PSS   anon (MiB)"]
        for side_name in ("seed", "ours"):
            if side_name not in res:
                continue
            m = res[side_name]
            lines.append(f"{side_name + ' (all)':26s} {fmt_mem(m)}")
            for g, gm in m["groups"].items():
                lines.append(f"  {g + ' ' + str(gm['pids']):24s} {fmt_mem(gm)}")
        if "seed" in res and "ours" in res:
            s, o = res["seed"], res["ours"]
            lines.append(f"ratio ours/seed: RSS {o['rss_mib'] / s['rss_mib']:.2f}, PSS {o['pss_mib'] / s['pss_mib']:.2f}"
                         f", anon {o['anon_mib'] / s['anon_mib']:.2f}")
        if rollup:
            lines.append(f"ours smaps_rollup: Pss_Anon {rollup.get('Pss_Anon', 0):.1f}, Pss_File "
                         f"{rollup.get('Pss_File', 0):.1f}, Shared_Clean {rollup.get('Shared_Clean', 0):.1f}, "
                         f"Private_Dirty {rollup.get('Private_Dirty', 0):.1f} MiB")
            lines.append(f"ours threads ({len(threads)}): {', '.join(threads)}")
        print("\n".join(lines), flush=True)
        if not args.no_analyse and args.only != "seed":
            (state / "analysis").mkdir()
            extra = analyse(state / "analysis", chain, key, htpasswd, store, warm_store, cafile, args, env)
            print("\n".join(extra), flush=True)
            lines += extra
    finally:
        if ours is not None:
            ours.stop()
        if seed is not None:
            seed.stop()
        shutil.rmtree(state, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "memory": res, "threads": threads,
                                                   "smaps_rollup": rollup}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
