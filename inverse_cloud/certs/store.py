"""Certificates on disk and the TLS context the HTTPS listener serves.

Disk layout (under ``[server] state_dir``/tls, 0700)::

    live/<serial-hex>/fullchain.pem   the chain, leaf first
    live/<serial-hex>/privkey.pem     0600
    current -> live/<serial-hex>      replaced atomically (symlink + rename), so a reader sees
                                      the old pair or the new pair, never one of each
    selfsigned/{fullchain,privkey}.pem  the stand-in served until a CA-issued certificate exists

Swapping never touches a live :class:`ssl.SSLContext` (reloading one in place can leave it with a new
certificate and no usable key). :meth:`TLSManager.load` builds a *fresh*
context, proves it with an in-memory handshake, and only then makes it current; the listening context's
``sni_callback`` hands each new handshake the current one. Connections already open keep theirs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inverse_cloud.certs.tls_alpn import AlpnResponder
from inverse_cloud.errors import CertStoreError
from inverse_cloud.fsutil import atomic_write, ensure_private_dir, fsync_dir

__all__ = ["CertInfo", "CertStore", "TLSManager", "make_self_signed", "server_context"]

log = logging.getLogger(__name__)

# Mozilla "intermediate" 6.0: TLS 1.2 + 1.3, ECDHE with AEAD only (no CBC, no DHE), no server order.
INTERMEDIATE_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class CertInfo:
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    names: tuple[str, ...]
    issuer: str
    self_signed: bool
    path: Path

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def describe(self) -> str:
        kind = "self-signed" if self.self_signed else f"issued by {self.issuer}"
        return (f"certificate serial {self.serial_hex} for {', '.join(self.names)} ({kind}), "
                f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC")


def server_context(chain_path: Path, key_path: Path) -> ssl.SSLContext:
    """A fresh server context with our TLS policy and this chain loaded.

    :raises CertStoreError: chain or key unreadable, or key does not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla 6.0: let the client pick (ChaCha on phones)
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(str(chain_path), str(key_path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise CertStoreError(f"{chain_path.parent}: certificate/key pair unusable ({_ssl_reason(exc)})") from exc
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, FileNotFoundError):
        return f"missing file {exc.filename}"
    return str(exc) or type(exc).__name__


def _prove_handshake(ctx: ssl.SSLContext, expected_serial: int) -> None:
    """Run a TLS handshake between ``ctx`` and a throwaway client in memory; check the served leaf."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    for _ in range(20):
        for obj, is_client in ((client, True), (server, False)):
            if (done_c if is_client else done_s):
                continue
            try:
                obj.do_handshake()
                if is_client:
                    done_c = True
                else:
                    done_s = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise CertStoreError(f"test handshake failed ({_ssl_reason(exc)})") from exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done_c and done_s:
            break
    der = client.getpeercert(binary_form=True)
    if not (done_c and done_s) or der is None:
        raise CertStoreError("test handshake did not complete")
    served = x509.load_der_x509_certificate(der).serial_number
    if served != expected_serial:
        raise CertStoreError(f"test handshake served serial {served:x}, expected {expected_serial:x}")


def _read_info(chain_path: Path, self_signed: bool) -> CertInfo:
    try:
        pem = chain_path.read_bytes()
        certs = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as exc:
        raise CertStoreError(f"certificate file {chain_path} unreadable ({_ssl_reason(exc)})") from exc
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        serial=leaf.serial_number, not_before=leaf.not_valid_before_utc.replace(tzinfo=None),
        not_after=leaf.not_valid_after_utc.replace(tzinfo=None), names=names,
        issuer=leaf.issuer.rfc4514_string(), self_signed=self_signed, path=chain_path.parent,
    )


def make_self_signed(domain: str, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``domain`` (PEM chain, PEM key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inverse-cloud self-signed")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class CertStore:
    """The certificate files under one directory. Pure file operations: no SSL contexts here."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def current_dir(self) -> Path:
        return self.root / "current"

    @property
    def selfsigned_dir(self) -> Path:
        return self.root / "selfsigned"

    def has_issued(self) -> bool:
        return (self.current_dir / "fullchain.pem").exists()

    def save(self, chain_pem: bytes, key_pem: bytes) -> Path:
        """Store a CA-issued pair and point ``current`` at it, all or nothing.

        :raises CertStoreError: the chain does not parse.
        """
        try:
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        except ValueError as exc:
            raise CertStoreError(f"refusing to store an unparsable certificate chain ({exc})") from exc
        ensure_private_dir(self.root)
        live = ensure_private_dir(self.root / "live")
        version = ensure_private_dir(live / format(leaf.serial_number, "x"))
        atomic_write(version / "privkey.pem", key_pem)
        atomic_write(version / "fullchain.pem", chain_pem)
        tmp_link = self.root / f".current.{os.getpid()}"
        try:
            tmp_link.unlink()
        except FileNotFoundError:
            pass
        os.symlink(os.path.relpath(version, self.root), tmp_link)
        os.replace(tmp_link, self.current_dir)
        fsync_dir(self.root)
        return version

    def ensure_self_signed(self, domain: str) -> Path:
        d = self.selfsigned_dir
        chain = d / "fullchain.pem"
        if chain.exists():
            try:
                info = _read_info(chain, True)
                if domain in info.names and info.not_after > dt.datetime.now(dt.UTC).replace(tzinfo=None):
                    return d
            except CertStoreError:
                pass
        cert_pem, key_pem = make_self_signed(domain)
        ensure_private_dir(self.root)
        ensure_private_dir(d)
        atomic_write(d / "privkey.pem", key_pem)
        atomic_write(d / "fullchain.pem", cert_pem)
        return d

    def prune(self, keep: int = 3) -> None:
        """Delete old versions, keeping the newest ``keep`` plus whatever ``current`` points at."""
        live = self.root / "live"
        if not live.is_dir():
            return
        cur = self.current_dir.resolve() if self.current_dir.exists() else None
        versions = sorted(live.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in versions[keep:]:
            if old.resolve() == cur:
                continue
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


class TLSManager:
    """Holds the context new handshakes get; swaps it only for a proven replacement."""

    def __init__(self, store: CertStore, domain: str) -> None:
        self.store = store
        self.domain = domain
        self._current: ssl.SSLContext | None = None
        self.info: CertInfo | None = None
        self.listening_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS-ALPN-01 answers: handshakes that offer acme-tls/1 for a pending name get the challenge context.
        self.alpn = AlpnResponder()

    @property
    def current(self) -> ssl.SSLContext:
        assert self._current is not None, "load() first"
        return self._current

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called for every handshake (with server_name None when the client sent no SNI), before ALPN is
        # negotiated: the context set here also decides the ALPN answer.
        challenge = self.alpn.context_for(sslobj, server_name)
        if challenge is not None:
            sslobj.context = challenge
        elif self._current is not None:
            sslobj.context = self._current

    def prepare(self, chain_dir: Path, self_signed: bool) -> tuple[ssl.SSLContext, CertInfo]:
        """Build and prove a context from ``chain_dir``; does not change what is served.

        :raises CertStoreError: the pair is unusable.
        """
        chain, key = chain_dir / "fullchain.pem", chain_dir / "privkey.pem"
        info = _read_info(chain, self_signed)
        ctx = server_context(chain, key)
        _prove_handshake(ctx, info.serial)
        return ctx, info

    def install(self, ctx: ssl.SSLContext, info: CertInfo) -> None:
        first = self._current is None
        self._current = ctx
        self.info = info
        if first:
            # The listening context needs a certificate of its own for clients whose handshake
            # OpenSSL completes before the SNI callback; give it the first proven one.
            self.listening_context = server_context(info.path / "fullchain.pem", info.path / "privkey.pem")
            self.listening_context.sni_callback = self._sni
            self.alpn.install(self.listening_context)

    def load(self) -> bool:
        """(Re)load from disk: the issued pair if present, else the self-signed stand-in.

        Returns True when the served certificate changed. A bad pair is refused with one log line
        and the current one keeps being served. On the very first load a bad issued pair falls back
        to the self-signed certificate.

        :raises CertStoreError: only on first load, if nothing at all can be served.
        """
        candidates: list[tuple[Path, bool]] = []
        if self.store.has_issued():
            candidates.append((self.store.current_dir.resolve(), False))
        for chain_dir, self_signed in candidates:
            try:
                ctx, info = self.prepare(chain_dir, self_signed)
            except CertStoreError as exc:
                if self.info is not None:
                    log.error("certificate in %s refused: %s; keeping %s", chain_dir, exc, self.info.describe())
                    return False
                log.error("certificate in %s refused: %s; falling back to a self-signed certificate",
                          chain_dir, exc)
                break
            if self.info is not None and self.info.serial == info.serial:
                return False
            self.install(ctx, info)
            log.info("serving %s", info.describe())
            return True
        if self.info is not None and not self.info.self_signed and not self.store.has_issued():
            return False
        if self.info is not None and self.info.self_signed:
            return False
        d = self.store.ensure_self_signed(self.domain)
        ctx, info = self.prepare(d, True)
        self.install(ctx, info)
        log.warning("no CA-issued certificate yet: serving a self-signed certificate for %s "
                    "(phones will not trust it; it is replaced as soon as one is obtained)", self.domain)
        return True
