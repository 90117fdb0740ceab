"""Reusable Pebble fixture: Debian's ``pebble`` (the ACME test CA) and ``pebble-challtestsrv`` (its DNS)
on free loopback ports, configured and stopped (by pid) by the test.

* challtestsrv answers every A query with 127.0.0.1 (``set-default-ipv4``) and no AAAA, so Pebble's
  validator connects to 127.0.0.1:<http_port> (HTTP-01) or 127.0.0.1:<tls_port> (TLS-ALPN-01): set them to
  where validation must land (our listeners directly, or the relay's forwarded ports).
* ``PEBBLE_VA_NOSLEEP=1`` (no random 0-15 s wait before each validation), ``PEBBLE_AUTHZREUSE=0`` (every
  renewal validates again, through the tunnel), Pebble's default 5% nonce rejection unless overridden.
* ``certificateValidityPeriod`` short (seconds) so renewal happens inside a test.
* Pebble's own HTTPS listener uses a CA we generate here (``wfe_ca``, give it to the ACME client as
  ``[acme] ca_bundle``); the root that signs issued certificates is regenerated at every Pebble start and
  fetched from the management port (``root_pem()``) for clients that must trust served certificates.

Usage::

    with PebbleCA(tmp_path / "pebble", http_port=port, validity_s=120) as ca:
        ca.directory, ca.wfe_ca, ca.write_root(path), ca.add_caa(...), ca.stop_pebble(), ca.start_pebble()
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import free_port, wait_until

__all__ = ["PebbleCA", "require_pebble"]


def require_pebble() -> None:
    """Fail (not skip) with a clear message when the Debian packages are missing."""
    missing = [b for b in ("pebble", "pebble-challtestsrv") if shutil.which(b) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found on PATH: apt-get install pebble "
                           "(Debian's package ships both binaries)")


def _distinct_free_ports(n: int) -> list[int]:
    """``n`` different ports, free for TCP and UDP (challtestsrv's DNS binds both)."""
    return [free_port(udp=True) for _ in range(n)]


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _make_wfe_cert(d: Path, valid_before: dt.timedelta, valid_after: dt.timedelta) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for 127.0.0.1/localhost: Pebble's own HTTPS (Debian ships no test cert),
    valid from now - ``valid_before`` to now + ``valid_after``."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - valid_before, now + valid_after
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inverse-cloud test pebble WFE CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = d / "wfe-ca.pem", d / "wfe.pem", d / "wfe.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return ca_path, cert_path, key_path


class PebbleCA:
    """pebble + pebble-challtestsrv. A context manager; every process it starts is stopped by pid."""

    def __init__(self, root: Path, *, http_port: int, validity_s: int = 300, nonce_reject: int | None = None,
                 default_ipv4: str = "127.0.0.1", env: dict[str, str] | None = None,
                 wfe_validity: tuple[dt.timedelta, dt.timedelta] = (dt.timedelta(minutes=5), dt.timedelta(days=2)),
                 tls_port: int = 0) -> None:
        """``wfe_validity``: how long before and after now Pebble's own HTTPS certificate is valid (a client
        whose clock is moved, F12, needs it wider). ``tls_port``: where TLS-ALPN-01 validation connects
        (0: a free port nobody listens on)."""
        require_pebble()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.validity_s = validity_s
        self.nonce_reject = nonce_reject
        self.default_ipv4 = default_ipv4
        self.extra_env = env or {}
        self.port, self.mgmt_port, self.dns_port, self.chall_mgmt_port, self.tls_port = _distinct_free_ports(5)
        self.tls_port = tls_port or self.tls_port
        self.wfe_ca, self.wfe_cert, self.wfe_key = _make_wfe_cert(root / "wfe", *wfe_validity)
        self._log_offset = 0
        self.pebble: subprocess.Popen[bytes] | None = None
        self.challtestsrv: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def dns_server(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    # --- processes -------------------------------------------------------------------------------------

    def start(self) -> PebbleCA:
        try:
            self.start_challtestsrv()
            self.start_pebble()
        except BaseException:
            self.stop()
            raise
        return self

    def start_challtestsrv(self) -> None:
        log = open(self.root / "challtestsrv.log", "ab")  # noqa: SIM115 (closed with the process)
        self.challtestsrv = subprocess.Popen(
            ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{self.chall_mgmt_port}",
             "-defaultIPv4", self.default_ipv4, "-defaultIPv6", ""],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self._alive(self.challtestsrv, "pebble-challtestsrv") and _tcp_open(self.chall_mgmt_port),
                   15, "pebble-challtestsrv management port", on_timeout=lambda: self.log("challtestsrv"))
        self.challtest("set-default-ipv4", {"ip": self.default_ipv4})
        self.challtest("set-default-ipv6", {"ip": ""})

    def start_pebble(self) -> None:
        """(Re)start pebble with the current ``http_port``. A restart forgets accounts and makes a new root."""
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.wfe_cert), "privateKey": str(self.wfe_key),
            "httpPort": self.http_port, "tlsPort": self.tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": self.validity_s,
        }}
        cfg_path = self.root / "pebble-config.json"
        cfg_path.write_text(json.dumps(config, indent=1))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", **self.extra_env}
        if self.nonce_reject is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject)
        log_path = self.root / "pebble.log"
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.pebble = subprocess.Popen(
            ["pebble", "-config", str(cfg_path), "-dnsserver", self.dns_server, "-strict=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        self.starts += 1
        wait_until(lambda: self._alive(self.pebble, "pebble") and _tcp_open(self.port) and _tcp_open(self.mgmt_port),
                   20, "pebble to listen", on_timeout=lambda: self.log("pebble"))

    def _alive(self, proc: subprocess.Popen[bytes] | None, what: str) -> bool:
        if proc is None or proc.poll() is not None:
            name = "challtestsrv" if "chall" in what else "pebble"
            raise RuntimeError(f"{what} exited ({proc.returncode if proc else '?'}):\n{self.log(name)}")
        return True

    def stop_pebble(self) -> None:
        self._stop(self.pebble)
        self.pebble = None

    def stop(self) -> None:
        self.stop_pebble()
        self._stop(self.challtestsrv)
        self.challtestsrv = None

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> PebbleCA:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self, which: str = "pebble") -> str:
        p = self.root / f"{which}.log"
        return p.read_text(errors="replace")[-6000:] if p.exists() else ""

    def run_log(self) -> str:
        """Pebble's log since its last (re)start."""
        p = self.root / "pebble.log"
        with open(p, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def orders(self) -> int:
        """Orders this Pebble run created (badNonce-rejected newOrder requests are not orders)."""
        return self.run_log().count("Added order ")

    def accounts(self) -> int:
        """Accounts this Pebble run holds (it logs the count after each new one)."""
        import re

        counts = re.findall(r"There are now (\d+) accounts in memory", self.run_log())
        return int(counts[-1]) if counts else 0

    # --- management APIs -------------------------------------------------------------------------------

    def _mgmt_get(self, path: str) -> bytes:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.wfe_ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}{path}", context=ctx, timeout=10) as r:
            data: bytes = r.read()
            return data

    def root_pem(self) -> bytes:
        """The root that signs certificates issued by *this* Pebble run."""
        return self._mgmt_get("/roots/0")

    def chain_pems(self) -> bytes:
        """Root + intermediate (for verifying a chain that includes the intermediate)."""
        return self._mgmt_get("/roots/0") + self._mgmt_get("/intermediates/0")

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem())
        return path

    def challtest(self, endpoint: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.chall_mgmt_port}/{endpoint}",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def add_caa(self, host: str, policies: list[tuple[str, str]]) -> None:
        """CAA records challtestsrv will answer for ``host`` (``[("issue", "letsencrypt.org; accounturi=...")]``)."""
        self.challtest("add-caa", {"host": host.rstrip(".") + ".",
                                   "policies": [{"tag": t, "value": v} for t, v in policies]})

    def clear_caa(self, host: str) -> None:
        self.challtest("clear-caa", {"host": host.rstrip(".") + "."})

    def wait_pebble_down(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while _tcp_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval of a deadline loop
