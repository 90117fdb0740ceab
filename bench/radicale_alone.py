#!/usr/bin/env python3
"""Radicale alone: the same DAVx5-like workload called through WSGI in this process (no HTTP, no TLS,
no threads), timed per phase as CPU of the calling thread (default) or wall time. It shows how much of
a phase is Radicale itself, and what a Radicale option changes:

    .venv/bin/python bench/radicale_alone.py --n 1000
    .venv/bin/python bench/radicale_alone.py --n 1000 --variant storage.use_mtime_and_size_for_item_cache=False

Radicale is configured as inverse-cloud configures it (inverse_cloud.dav.radicale_app.radicale_options),
then each --variant (SECTION.KEY=VALUE) is applied on top: one run per variant, plus one without.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed-stack" / "workload"))
sys.path.insert(0, str(HERE.parent))

from carddav_bench import make_vcard  # noqa: E402

from tests.support import init_instance  # noqa: E402

AUTH = "Basic " + base64.b64encode(b"alice:correct horse").decode()
PROPFIND = (b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getetag/>'
            b'<d:getcontenttype/></d:prop></d:propfind>')


def sync_body(token: str) -> bytes:
    return (f'<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token>{token}</d:sync-token>'
            '<d:sync-level>1</d:sync-level><d:prop><d:getetag/></d:prop></d:sync-collection>').encode()


def multiget_body(hrefs: list[str]) -> bytes:
    return ('<?xml version="1.0"?><card:addressbook-multiget xmlns:d="DAV:" '
            'xmlns:card="urn:ietf:params:xml:ns:carddav"><d:prop><d:getetag/><card:address-data/></d:prop>'
            + "".join(f"<d:href>{h}</d:href>" for h in hrefs) + "</card:addressbook-multiget>").encode()


class Caller:
    def __init__(self, app: Any, clock: Callable[[], float]) -> None:
        self.app, self.clock = app, clock

    def __call__(self, method: str, path: str, body: bytes = b"", depth: str | None = None,
                 ctype: str = "application/xml") -> tuple[str, bytes, float]:
        env = {"REQUEST_METHOD": method, "SCRIPT_NAME": "/radicale", "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "laptop.test", "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "https", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": sys.stderr, "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": ctype,
               "HTTP_AUTHORIZATION": AUTH, "HTTP_ACCEPT_ENCODING": "gzip"}
        if depth:
            env["HTTP_DEPTH"] = depth
        status: list[str] = []
        t0 = self.clock()
        out = b"".join(self.app(env, lambda s, h, e=None: status.append(s)))
        return status[0], out, self.clock() - t0


def run(variant: list[str], n: int, repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    from inverse_cloud import config
    from inverse_cloud.dav.radicale_app import build_application

    root = Path(tempfile.mkdtemp(prefix="icradicale-"))
    try:
        extra = "\n".join(f'\n[radicale.{o.split("=", 1)[0].split(".", 1)[0]}]\n'
                          f'{o.split("=", 1)[0].split(".", 1)[1]} = "{o.split("=", 1)[1]}"' for o in variant)
        cfg_path = init_instance(root)
        if extra:
            with open(cfg_path, "a") as f:
                f.write(extra + "\n")
        call = Caller(build_application(config.load(cfg_path)), clock)
        rng = random.Random(42)
        cards = [make_vcard(i, rng, 15000 if i % 10 == 0 else 0) for i in range(n)]
        call("PROPFIND", "/", depth="0")
        call("MKCOL", "/alice/b/", b'<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" xmlns:card="urn:ietf:params:xml'
             b':ns:carddav"><d:set><d:prop><d:resourcetype><d:collection/><card:addressbook/></d:resourcetype>'
             b'</d:prop></d:set></d:mkcol>')
        put = [call("PUT", f"/alice/b/{uid}.vcf", v.encode(), ctype="text/vcard")[2] for uid, v in cards]
        res = {"put_total_s": sum(put), "put_last100_ms": statistics.fmean(put[-100:]) * 1000}
        hrefs = [f"/radicale/alice/b/{uid}.vcf" for uid, _ in cards]
        samples: dict[str, list[float]] = {"propfind": [], "multiget": [], "sync_initial": [], "sync_nochange": [],
                                           "get": []}
        for _ in range(repeats):
            samples["propfind"].append(call("PROPFIND", "/alice/b/", PROPFIND, depth="1")[2])
            samples["multiget"].append(sum(call("REPORT", "/alice/b/", multiget_body(hrefs[i:i + 100]), depth="1")[2]
                                           for i in range(0, n, 100)))
            _, out, dt = call("REPORT", "/alice/b/", sync_body(""), depth="0")
            samples["sync_initial"].append(dt)
            text = gzip.decompress(out) if out[:2] == b"\x1f\x8b" else out
            match = re.search(rb"sync-token>([^<]*)<", text)
            token = match.group(1).decode() if match else ""
            samples["sync_nochange"].append(call("REPORT", "/alice/b/", sync_body(token), depth="0")[2])
            samples["get"].append(statistics.median(call("GET", h[len("/radicale"):])[2] for h in hrefs[:50]))
        for k, v in samples.items():
            res[f"{k}_ms"] = statistics.median(v) * 1000
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="read phases are repeated, the median printed")
    ap.add_argument("--variant", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--wall", action="store_true", help="wall time instead of thread CPU")
    args = ap.parse_args()
    clock = time.perf_counter if args.wall else time.thread_time
    runs = [("inverse-cloud's options", [])] + [(v, [v]) for v in args.variant]
    print(f"Radicale alone, n={args.n}, {'wall time' if args.wall else 'CPU of the calling thread'}")
    for label, variant in runs:
        res = run(variant, args.n, args.repeats, clock)
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
