"""Descriptors the tunnel holds for N idle channels from one relay-seen address, in-process (printed, never
asserted). Each accepted channel costs two descriptors (the loopback socket and our listener's accepted one);
the admission cap (tunnel/admission.py) refuses channels beyond 32 per address before a socket is made.

    .venv/bin/python bench/descriptors_bench.py 600
    # this branch: accepted 32, refused 568, descriptors +64; before the cap: accepted 600, descriptors +1200
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import asyncssh

from inverse_cloud.config import loads
from inverse_cloud.tunnel.link import Tunnel
from tests.test_tunnel import EchoTarget


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    target = EchoTarget()
    await target.start()
    cfg = loads(f'[server]\ndomain = "laptop.test"\ndata_dir = "{tmp}/d"\nstate_dir = "{tmp}/s"\n'
                '[relay]\nhost = "127.0.0.1"\n', tmp / "c.toml")
    t = Tunnel(cfg, target)
    before = len(os.listdir("/proc/self/fd"))
    ends, refused = [], 0
    for i in range(n):
        try:
            ends.append(await t._accept(t.forwards[0], "203.0.113.9", 40000 + i))
        except asyncssh.ChannelOpenError:
            refused += 1
    held = len(os.listdir("/proc/self/fd")) - before
    print(f"{n} channels from one address: accepted {len(ends)}, refused {refused}, descriptors +{held}")
    for end in ends:
        end.local.close()
    await target.aclose()

if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 600))
