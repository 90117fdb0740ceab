"""L5 (docs/test-matrix.md): a connection flood on the relay's public HTTPS port. 2,000 TCP connects, each closed at
once, go to the relay's forwarded port of a real sshd; every one becomes an SSH channel to our tunnel and a
loopback connection to our HTTPS listener. The process must survive, keep its tunnel session, answer a real
sync afterwards, write at most a line or two about it (no line per connection) and give back every file
descriptor the flood took."""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path

from dav_helpers import DavClient, new_uid, selfsigned_cert, vcard

from tests.support import ServeProcess, wait_until

CONTACTS = "/radicale/alice/contacts/"
FLOOD_CONNECTS = 2000
FLOOD_MAX_S = 30.0      # the row's 10 s is the load's rate; this bounds the loop on a slow machine
FD_SLACK = 4            # keep-alive connections of the checks themselves may still be open


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_fd_count(pid: int) -> int:
    """The process's fd count once two readings 0.2 s apart agree (closing connections settle)."""
    last: list[int | None] = [None]

    def same() -> int | None:
        n = fd_count(pid)
        agreed = n if n == last[0] else None
        last[0] = n
        return agreed

    return wait_until(same, 10, "a steady fd count", interval_s=0.2)


def flood(port: int) -> tuple[int, int, float]:
    """FLOOD_CONNECTS connects to 127.0.0.1:port, each closed at once (half of them with an RST, as a scanner's
    aborted connect looks, half with a FIN); returns (connected, refused, seconds)."""
    connected = refused = 0
    t0 = time.monotonic()
    for i in range(FLOOD_CONNECTS):
        if time.monotonic() - t0 > FLOOD_MAX_S:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            connected += 1
        except OSError:
            refused += 1
        finally:
            s.close()
    return connected, refused, time.monotonic() - t0


def test_l5_connection_flood_through_the_relay(relay_instance, tmp_path: Path) -> None:
    """L5: 2,000 connects (each closed at once) to the relay's forwarded HTTPS port while the tunnel is up.
    Expected: at least half of them were made and the relay accepted some; serve is alive; a PUT and a
    PROPFIND through the relay work again within 60 s (the flood's channels count against the same address
    until closed); the tunnel kept its sshd session; the fd count returns to the steady baseline (+ slack);
    no traceback and at most two WARNING/ERROR lines; exit 0 on stop. Counts and times are printed."""
    cfg, relay = relay_instance
    cafile = selfsigned_cert(cfg.parent)
    with ServeProcess(cfg) as srv:
        relay.wait_forwards(30, on_timeout=srv.log)
        session = relay.holders()
        assert srv.proc is not None
        pid = srv.proc.pid
        with DavClient(relay.https_port, cafile) as dav:   # warm: the tunnel has carried a real request
            assert dav.request("PROPFIND", CONTACTS, headers={"Depth": "0"}).status == 207
        baseline = steady_fd_count(pid)
        mark = len(srv.log())

        connected, refused, took = flood(relay.https_port)
        peak = fd_count(pid)
        print(f"\nflood: {connected} connects accepted by the relay, {refused} refused, in {took:.1f} s; "
              f"fds {baseline} before, {peak} right after")
        assert connected + refused >= FLOOD_CONNECTS / 2, "the flood loop ran out of time before half of it"
        assert connected > 0, "the relay refused every connect: nothing was flooded"

        t0 = time.monotonic()
        assert srv.proc.poll() is None, f"serve died under the flood:\n{srv.log()[mark:][-3000:]}"
        uid = new_uid()

        def synced() -> bool | None:
            # The flood came from the relay-seen address this client uses too (127.0.0.1), so its channels
            # count against that address's cap until they have closed: retried until they have.
            try:
                with DavClient(relay.https_port, cafile, timeout=30) as dav:
                    assert dav.put(f"{CONTACTS}{uid}.vcf", vcard(uid, "After the flood")).status in (201, 204)
                    return f"{CONTACTS}{uid}.vcf" in dav.hrefs(CONTACTS) or None
            except (ConnectionError, OSError):
                return None

        wait_until(synced, 60, "a sync through the relay after the flood", interval_s=0.5, on_timeout=srv.log)
        print(f"a sync through the relay works {time.monotonic() - t0:.2f} s after the flood")
        assert relay.holders() == session, "the tunnel lost its session to the flood"

        def back_to_baseline() -> int | None:
            n = fd_count(pid)
            return n if n <= baseline + FD_SLACK else None

        settled = wait_until(back_to_baseline, 60, f"the fd count to return to {baseline} (+{FD_SLACK})",
                             interval_s=0.2, on_timeout=lambda: f"fds now {fd_count(pid)}")
        print(f"fds back to {settled} (baseline {baseline}) {time.monotonic() - t0:.2f} s after the flood")

        new = srv.log()[mark:]
        assert "Traceback" not in new
        noisy = [line for line in new.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]
        print(f"log lines during and after the flood: {len(new.splitlines())}, of them warnings/errors: {len(noisy)}")
        assert len(noisy) <= 2, "a line per connection, not one per interval:\n" + "\n".join(noisy[:20])
        assert srv.stop() == 0
