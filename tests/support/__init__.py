"""Helpers shared by tests/, integration/ and bench/: waiting with a deadline, free ports, and an
``inverse-cloud serve`` child process that is always stopped by pid. Not used by the server itself."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ServeProcess", "ThrowawayCA", "client_handshake", "default_signals", "free_port",
           "handshake_with_permissive_server", "init_instance", "wait_until"]

T = TypeVar("T")


def default_signals() -> None:
    """A child's ``preexec_fn``: SIGINT, SIGQUIT and SIGHUP back to their defaults, as a terminal gives a
    foreground command. A test run started as a background job of a non-interactive shell, or under nohup,
    inherits them ignored, and an ignored signal stays ignored across exec: Python then installs no Ctrl-C
    handler and sh cannot trap SIGHUP, so tests that send those signals would test nothing."""
    import signal

    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.02,
               on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    :raises TimeoutError: naming ``what`` (plus ``on_timeout()``, e.g. a child's stderr) after the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{extra}")
        time.sleep(interval_s)  # polling interval of a deadline loop, not a wait for a server


# Ports handed out by free_port in this process: a port chosen but not yet bound looks free again.
_HANDED_OUT: set[int] = set()
_LOWEST_PORT = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def _bindable(host: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A port that is free on ``host`` for TCP (and for UDP too if ``udp``), never the same twice in a process.

    Chosen outside the kernel's ephemeral range (ip_local_port_range): a port the kernel picked with bind(0)
    can be taken as the *source* port of any outgoing connection (a test's clients, sshd, Pebble) before the
    server under test binds it, which made a CI run fail with "port ... already in use"."""
    import random

    lo, hi = _ephemeral_range()
    first, last = (_LOWEST_PORT, lo - 1) if lo - _LOWEST_PORT >= 2000 else (hi + 1, 65535)
    rng = random.SystemRandom()
    for _ in range(500):  # bounded; the range holds thousands of ports
        port = rng.randint(first, last)
        if port in _HANDED_OUT or not _bindable(host, port, socket.SOCK_STREAM):
            continue
        if udp and not _bindable(host, port, socket.SOCK_DGRAM):
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on {host} between {first} and {last} after 500 tries")


def init_instance(root: Path, *, domain: str = "laptop.test", user: str = "alice", password: str = "correct horse",  # noqa: S107 (test fixture)
                  extra_toml: str = "", relay: str = "", acme_directory: str = "", acme_ca_bundle: str = "",
                  python: str = sys.executable) -> Path:
    """Run ``inverse-cloud init`` non-interactively into ``root``; return the config path.
    ``extra_toml`` is appended to the [server] table (e.g. "max_body_bytes = 1048576")."""
    root.mkdir(parents=True, exist_ok=True)
    pw = root / "password"
    pw.write_text(password)
    cfg = root / "config.toml"
    args = [python, "-m", "inverse_cloud.cli", "init", "--non-interactive", "--config", str(cfg),
            "--data-dir", str(root / "data"), "--state-dir", str(root / "state"), "--domain", domain,
            "--user", user, "--password-file", str(pw), "--https-listen", f"127.0.0.1:{free_port()}",
            "--http-listen", f"127.0.0.1:{free_port()}", "--relay", relay, "--acme-email", ""]
    if acme_directory:
        args += ["--acme-directory", acme_directory]
    if acme_ca_bundle:
        args += ["--acme-ca-bundle", acme_ca_bundle]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)
    if extra_toml:
        text = cfg.read_text()
        text = text.replace("[server]\n", "[server]\n" + extra_toml.rstrip("\n") + "\n", 1)
        cfg.write_text(text)
    return cfg


@dataclass
class ServeProcess:
    """``inverse-cloud serve`` as a child process. Use as a context manager; it is always stopped.

    ``prefix`` runs it through another command, e.g. ``["ip", "netns", "exec", NAME]`` (the laptop in its own
    network namespace). The prefix must exec the command, so that the child's pid stays serve's (``ip netns
    exec`` and ``nsenter`` do): every signal and the stop still go to serve by pid. ``ready_probe(port)`` says
    whether serve answers on its HTTPS port; by default a TLS handshake to 127.0.0.1 from this process, which
    cannot see into another network namespace."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    prefix: list[str] = field(default_factory=list)
    ready_probe: Callable[[int], bool] | None = None

    def _ports(self) -> tuple[int, int]:
        from inverse_cloud.config import load

        cfg = load(self.config)
        return cfg.server.https_listen[1], cfg.server.http_listen[1]

    @property
    def https_port(self) -> int:
        return self._ports()[0]

    @property
    def http_port(self) -> int:
        return self._ports()[1]

    def start(self, timeout_s: float = 30) -> ServeProcess:
        self.log_path = self.config.parent / f"serve-{int(time.time() * 1000)}.log"
        env = {**os.environ, **self.env}
        env.pop("RADICALE_CONFIG", None) if "RADICALE_CONFIG" not in self.env else None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*self.prefix, self.python, "-m", "inverse_cloud.cli", "serve", "--config",
                                          str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            # __exit__ never runs when __enter__ raises: stop the child here, or it outlives the test.
            self.kill()
            raise
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        port = self.https_port

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"inverse-cloud serve exited with {self.proc.returncode}:\n{self.log()}")
            return self.ready_probe(port) if self.ready_probe else tls_handshake_ok("127.0.0.1", port)

        wait_until(ready, timeout_s, f"inverse-cloud serve on port {port}", on_timeout=self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def tls_handshake_ok(host: str, port: int) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=2) as raw, ctx.wrap_socket(raw):
            return True
    except OSError:
        return False


def served_certificate_serial(host: str, port: int, server_name: str = "laptop.test") -> int:
    """The serial of the leaf certificate a fresh handshake to ``host:port`` presents."""
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def client_handshake(port: int, lo: ssl.TLSVersion, hi: ssl.TLSVersion, server_name: str = "laptop.test") -> str:
    """Handshake as a client limited to versions lo..hi, offering every cipher an old phone would; the
    version negotiated. :raises ssl.SSLError, ConnectionError: the handshake failed."""
    import warnings

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated: that is the point
        ctx.minimum_version, ctx.maximum_version = lo, hi
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        return str(s.version())


def handshake_with_permissive_server(work_dir: Path, version: ssl.TLSVersion) -> str:
    """:func:`client_handshake` limited to ``version``, against a server that still allows TLS 1.0: the
    control for a test that our server refuses ``version`` (it shows this machine's OpenSSL can speak it)."""
    import threading
    import warnings

    from inverse_cloud.certs.store import CertStore

    d = CertStore(work_dir).ensure_self_signed("laptop.test")
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv.minimum_version = ssl.TLSVersion.TLSv1
    srv.load_cert_chain(d / "fullchain.pem", d / "privkey.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept_one() -> None:
            conn, _ = listener.accept()
            try:
                srv.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        t = threading.Thread(target=accept_one)
        t.start()
        try:
            return client_handshake(listener.getsockname()[1], version, version)
        finally:
            t.join(5)


class ThrowawayCA:
    """A CA that issues leaf certificates for one name (what Pebble or Let's Encrypt would hand out), for
    certificate-swap tests. With ``work_dir`` its root is written to ``work_dir/local-ca.pem`` (``cafile``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, work_dir: Path | None = None, domain: str = "laptop.test") -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.domain = domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inverse-cloud throwaway test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cafile: Path | None = None
        if work_dir is not None:
            self.cafile = work_dir / "local-ca.pem"
            self.cafile.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, domain: str | None = None) -> tuple[bytes, bytes, int]:
        """A new leaf for ``domain``: (fullchain PEM, key PEM, serial)."""
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        name = domain or self.domain
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        enc = serialization.Encoding.PEM
        chain = leaf.public_bytes(enc) + self.cert.public_bytes(enc)
        key_pem = key.private_bytes(enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return chain, key_pem, int(leaf.serial_number)


async def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    """The event-loop twin of :func:`wait_until`: poll ``predicate`` until it holds, TimeoutError naming
    ``what`` after the deadline."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
