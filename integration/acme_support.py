"""Helpers for the ACME integration tests: configure an instance for a Pebble CA, run ``inverse-cloud cert``,
and a sync load (one long-lived keep-alive HTTPS connection + a fresh *verified* handshake per round) that
counts failed handshakes and dropped requests across a certificate swap."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from dav_helpers import VerifiedConn
from pebble import PebbleCA
from relay_sshd import configure

from tests.support import wait_until

DOMAIN = "laptop.test"
PASSWORD = "correct horse"


def configure_acme(cfg: Path, ca: PebbleCA, self_check_port: int, *, directory: str = "", **extra: Any) -> None:
    """Point [acme] at ``ca`` (or ``directory``, e.g. a shim in front of it); the self-check goes to
    127.0.0.1:<self_check_port> (the "public 80" stand-in); CAA look-ups ask challtestsrv."""
    configure(cfg, "acme", enabled=True, directory=directory or ca.directory, ca_bundle=str(ca.wfe_ca),
              self_check_address=f"127.0.0.1:{self_check_port}", dns_server=ca.dns_server,
              caa_issuer="pebble.test", check_interval_s=2, **extra)


def cert_cli(cfg: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "cert", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def tls_context(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def verified_serial(port: int, cafile: Path) -> int | None:
    """Serial presented by a fresh handshake that *verifies* against ``cafile`` for laptop.test, else None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                tls_context(cafile).wrap_socket(raw, server_hostname=DOMAIN) as s:
            der = s.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return int(x509.load_der_x509_certificate(der).serial_number) if der else None


def wait_issued(port: int, cafile: Path, timeout_s: float, on_timeout: Any = None, not_serial: int = 0) -> int:
    """Poll until a verified handshake presents a serial (other than ``not_serial``)."""
    def ok() -> int | None:
        s = verified_serial(port, cafile)
        return s if s and s != not_serial else None

    return wait_until(ok, timeout_s, f"a certificate that verifies against {cafile.name} on port {port}",
                      interval_s=0.05, on_timeout=on_timeout)


@dataclass
class SyncLoad:
    """In a thread until stopped (at most ``max_rounds`` rounds / ``max_s`` seconds): a PROPFIND on one
    long-lived keep-alive connection, and one fresh verified handshake, per round."""

    port: int
    cafile: Path
    max_rounds: int = 5000
    max_s: float = 200.0
    failures: list[str] = field(default_factory=list)
    requests_ok: int = 0
    handshakes_ok: int = 0
    fresh_serials: list[int] = field(default_factory=list)
    long_serial: int = 0
    # (serial the long-lived connection presents, serial a fresh handshake got) for every round with both
    rounds: list[tuple[int, int]] = field(default_factory=list)
    reconnects: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._auth = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    def start(self) -> SyncLoad:
        self._thread.start()
        wait_until(lambda: self.requests_ok > 0 or self.failures, 30, "the first request of the load")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        ctx = tls_context(self.cafile)
        conn = VerifiedConn(self.port, ctx, timeout=20)
        # The socket object itself, held: an id() of a closed socket can be reused by the next one.
        first_sock = None
        deadline = time.monotonic() + self.max_s
        for _ in range(self.max_rounds):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            try:
                conn.request("PROPFIND", "/radicale/alice/",
                             headers={"Host": DOMAIN, "Authorization": self._auth, "Depth": "0"})
                with conn.getresponse() as resp:
                    resp.read()
                if resp.status != 207:
                    self.failures.append(f"request answered {resp.status}")
                else:
                    self.requests_ok += 1
                assert conn.sock is not None
                der = conn.sock.getpeercert(binary_form=True)
                long_serial = x509.load_der_x509_certificate(der).serial_number if der else 0
                if first_sock is None:
                    first_sock, self.long_serial = conn.sock, long_serial
                elif conn.sock is not first_sock:
                    self.reconnects += 1
                    first_sock = conn.sock
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"long-lived connection: {type(exc).__name__}: {exc}")
                conn.close()
                long_serial = 0
            serial = verified_serial(self.port, self.cafile)
            if serial is None:
                self.failures.append("fresh handshake failed")
            else:
                self.handshakes_ok += 1
                if not self.fresh_serials or self.fresh_serials[-1] != serial:
                    self.fresh_serials.append(serial)
                if long_serial:
                    self.rounds.append((long_serial, serial))
            self._stop.wait(0.05)  # pacing of the load generator
        conn.close()
