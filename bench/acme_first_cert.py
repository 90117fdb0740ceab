#!/usr/bin/env python3
"""Time to the first publicly valid HTTPS response, and renewal-to-served, against the seed stack.

    python bench/acme_first_cert.py [--runs 3] [--no-seed] [--nonce-reject 0]
        [--seed-venv DIR]   (a venv with certbot, for the seed's cert.sh; default /tmp/b_acme/seedvenv)

ours: a fresh instance (empty data dir) with a real sshd relay (integration/relay_sshd.py) and Pebble
(PEBBLE_VA_NOSLEEP=1, validation on the relay's forwarded HTTP port). The clock starts right before
``inverse-cloud serve`` is spawned and stops at the first PROPFIND through the relay's forwarded HTTPS port
that verifies against Pebble's root (207). Renewal: ``cert renew --force``; "internal" is the manager's own
figure (self-check + order + swap + served-serial proof), "external" runs from the CLI call until a verified
handshake through the relay presents the new serial (includes the CLI's Python start).

seed: bench/seed-stack ``stack.sh up`` on free ports (radicale + nginx + autossh, certbot --webroot through the
tunnel, nginx reload, one phone request): its "chain up" figure and certbot's own wall time.

Runs are interleaved (ours, seed, ours, ...). Prints min / median. Needs root (sshd, a system user).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "integration"), str(ROOT)]

from acme_support import configure_acme, verified_serial  # noqa: E402
from pebble import PebbleCA  # noqa: E402
from relay_sshd import TEST_USER, configure, relay_sshd  # noqa: E402

from tests.support import ServeProcess, free_port, init_instance, wait_until  # noqa: E402


def propfind_207(port: int, cafile: Path) -> bool:
    r = subprocess.run(["curl", "-s", "--max-time", "5", "--cacert", str(cafile), "--resolve",
                        f"laptop.test:{port}:127.0.0.1", "-u", "alice:correct horse", "-X", "PROPFIND", "-H",
                        "Depth: 0", "-o", "/dev/null", "-w", "%{http_code}", f"https://laptop.test:{port}/radicale/alice/"],
                       capture_output=True, text=True, timeout=10, check=False)
    return r.stdout == "207"


def run_ours(nonce_reject: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ic-acme-bench-") as tmp:
        t = Path(tmp)
        cfg = init_instance(t / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
        configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
        with relay_sshd(cfg) as relay, PebbleCA(t / "pebble", http_port=relay.http_port, validity_s=3600,
                                                 nonce_reject=nonce_reject) as ca:
            configure_acme(cfg, ca, relay.http_port)
            root = ca.write_root(t / "root.pem")
            srv = ServeProcess(cfg)
            t0 = time.monotonic()
            srv.start()
            try:
                wait_until(lambda: propfind_207(relay.https_port, root), 60, "first verified PROPFIND",
                           interval_s=0.02, on_timeout=srv.log)
                first_s = time.monotonic() - t0
                first = verified_serial(relay.https_port, root)
                t1 = time.monotonic()
                subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "cert", "renew", "--force", "--config",
                                str(cfg)], capture_output=True, check=True, timeout=60)
                wait_until(lambda: verified_serial(relay.https_port, root) not in (None, first), 30, "renewal",
                           interval_s=0.02)
                external_s = time.monotonic() - t1
                m = re.search(r"certificate renewed: .*\((\d+\.\d+) s", srv.log())
                internal_s = float(m.group(1)) if m else float("nan")
            finally:
                srv.stop()
    return {"first_response_s": first_s, "renew_internal_s": internal_s, "renew_external_s": external_s}


def run_seed(seed_venv: Path) -> dict[str, float]:
    stack = ROOT / "bench" / "seed-stack" / "infra" / "stack.sh"
    with tempfile.TemporaryDirectory(prefix="ic-seed-bench-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (nginx workers run as www-data and must reach the webroot)
        state = Path(tmp) / "state"
        env = {**os.environ, "BENCH_STATE": str(state), "VENV": str(seed_venv), "PY": sys.executable,
               "PEBBLE_WFE_NONCEREJECT": "0"}
        for var in ("RELAY_SSH_PORT", "RELAY_HTTPS_PORT", "RELAY_HTTP_PORT", "NGINX_HTTP_PORT", "NGINX_HTTPS_PORT",
                    "RADICALE_PORT", "PEBBLE_PORT", "PEBBLE_MGMT_PORT", "CHALLTEST_DNS_PORT", "CHALLTEST_MGMT_PORT"):
            env[var] = str(free_port())
        try:
            up = subprocess.run(["bash", str(stack), "up"], env=env, capture_output=True, text=True, timeout=180,
                                check=False)
            m = re.search(r"chain up: .* in (\d+) ms", up.stdout)
            if up.returncode != 0 or not m:
                raise RuntimeError(f"seed stack failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
            certbot_ms = int((state / "certbot" / "issue_ms").read_text())
        finally:
            subprocess.run(["bash", str(stack), "down", "--purge"], env=env, capture_output=True, timeout=120,
                           check=False)
    return {"first_response_s": int(m.group(1)) / 1000, "certbot_s": certbot_ms / 1000}


def summary(name: str, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    for key in rows[0]:
        vals = [r[key] for r in rows]
        print(f"{name:5s} {key:18s} min {min(vals):6.2f} s  median {statistics.median(vals):6.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in vals)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-seed", action="store_true")
    ap.add_argument("--nonce-reject", type=int, default=0, help="PEBBLE_WFE_NONCEREJECT for ours (seed: 0)")
    ap.add_argument("--seed-venv", default="/tmp/b_acme/seedvenv")
    args = ap.parse_args()
    ours: list[dict[str, float]] = []
    seed: list[dict[str, float]] = []
    for i in range(args.runs):
        ours.append(run_ours(args.nonce_reject))
        print(f"run {i + 1} ours: {ours[-1]}", flush=True)
        if not args.no_seed:
            seed.append(run_seed(Path(args.seed_venv)))
            print(f"run {i + 1} seed: {seed[-1]}", flush=True)
    summary("ours", ours)
    summary("seed", seed)
    if seed:
        ratio = statistics.median(r["first_response_s"] for r in ours) / statistics.median(
            r["first_response_s"] for r in seed)
        print(f"first verified response, ours / seed (medians): {ratio:.2f} (target <= 0.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
