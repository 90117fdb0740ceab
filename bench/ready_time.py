"""Time from starting `inverse-cloud serve` to systemd's READY=1 (sd_notify over a datagram socket we own),
and to the first authenticated PROPFIND answered, on loopback without a relay. Prints JSON.

    python bench/ready_time.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import init_instance, tls_handshake_ok, wait_until  # noqa: E402


def one_run(cfg: Path, notify: Path) -> dict[str, float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.05)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    from inverse_cloud.config import load

    port = load(cfg).server.https_listen[1]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "inverse_cloud.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        ready_at = 0.0

        def ready() -> bool:
            nonlocal ready_at
            try:
                if b"READY=1" in sock.recv(4096):
                    ready_at = time.monotonic()
                    return True
            except (TimeoutError, BlockingIOError):
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            return False

        wait_until(ready, 60, "READY=1")
        wait_until(lambda: tls_handshake_ok("127.0.0.1", port), 30, "TLS")
        out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-u", "bench:bench password",
                              "-X", "PROPFIND", "-H", "Depth: 1", f"https://127.0.0.1:{port}/radicale/bench/"],
                             capture_output=True, text=True, timeout=30)
        first = time.monotonic()
        assert out.stdout == "207", out.stdout
        return {"ready_ms": (ready_at - t0) * 1000, "first_propfind_ms": (first - t0) * 1000}
    finally:
        proc.terminate()
        proc.wait(30)
        sock.close()
        notify.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = init_instance(Path(d) / "ic", user="bench", password="bench password")
        runs = [one_run(cfg, Path(d) / "notify.sock") for _ in range(max(1, min(args.runs, 50)))]
    out = {k: {"min": round(min(r[k] for r in runs)), "median": round(statistics.median(r[k] for r in runs))}
           for k in runs[0]}
    print(json.dumps({"runs": len(runs), **out}))


if __name__ == "__main__":
    main()
