"""The certificate manager (inverse_cloud/certs/manager.py) with an injected wall clock and monotonic clock,
a fake ACME driver (certificates from a throwaway CA dated by the injected clock), a real TLSManager/CertStore
and a real in-process HTTP-01 listener for the public-path self-check.

Covers F12 (clock jumps +100 d / -2 d; a certificate already expired on arrival; an unexpected error in an
attempt), the persisted backoff (F6's restart part), Retry-After holding even a forced renewal (F7's rule), and
F13 (self-check fails -> no order)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inverse_cloud import config as config_mod
from inverse_cloud.certs.acme_client import AccountStore, Issued
from inverse_cloud.certs.manager import CertManager, StateFiles, served_certificate_serial
from inverse_cloud.certs.policy import AriWindow, ari_cert_id
from inverse_cloud.certs.store import CertStore, TLSManager
from inverse_cloud.dav.web import ChallengeStore, make_http_app
from inverse_cloud.errors import AcmeError, RateLimited
from tests.support import free_port

DOMAIN = "laptop.test"
DIRECTORY = "https://ca.invalid/dir"
DAY = 86400.0


class FakeClock:
    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = 1000.0


class FakeDriver:
    """Issues certificates from a throwaway CA, valid from the injected wall clock; or raises queued errors."""

    def __init__(self, root: Path, clock: FakeClock, lifetime_s: float = 90 * DAY) -> None:
        self.accounts = AccountStore(root / "acme")
        self.clock, self.lifetime_s = clock, lifetime_s
        self.errors: list[Exception] = []
        self.orders = 0
        self.replaces: list[str] = []
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ari: AriWindow | None = None   # None: the CA offers no renewalInfo
        self.ari_asked: list[str] = []
        self.skew_s = 0.0    # the CA's clock minus ours: certificates are dated by the CA's clock

    async def issue(self, challenges: Any, *, replaces: str = "", **_method: Any) -> Issued:
        self.orders += 1
        self.replaces.append(replaces)
        if self.errors:
            raise self.errors.pop(0)
        self.accounts.save_account_uri(DIRECTORY, "https://ca.invalid/acct/1")
        key = ec.generate_private_key(ec.SECP256R1())
        nb = dt.datetime.fromtimestamp(self.clock.wall + self.skew_s, dt.UTC) - dt.timedelta(seconds=1)
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake CA")])
        cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(nb).not_valid_after(nb + dt.timedelta(seconds=self.lifetime_s))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                               critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()), "")

    async def supports_ari(self) -> bool:
        return self.ari is not None

    async def renewal_info(self, cert_id: str) -> tuple[AriWindow | None, float | None]:
        assert self.ari is not None, "not asked: the CA offers no ARI"
        self.ari_asked.append(cert_id)
        return self.ari, 6 * 3600.0

    async def aclose(self) -> None:
        pass


def make_cfg(tmp_path: Path, self_check_port: int, check_interval_s: float = 600) -> config_mod.Config:
    text = f"""
[server]
domain = "{DOMAIN}"
data_dir = "{tmp_path / 'data'}"
state_dir = "{tmp_path / 'state'}"
[acme]
enabled = true
directory = "{DIRECTORY}"
self_check_address = "127.0.0.1:{self_check_port}"
dns_server = "127.0.0.1:{free_port()}"
caa_issuer = "ca.invalid"
check_interval_s = {check_interval_s}
"""
    return config_mod.loads(text)


async def until(pred: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll an in-process condition with a deadline (the manager runs on this loop)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def settle(m: CertManager) -> None:
    """Let the manager finish the check in progress and go round its loop (before moving the clock again)."""
    ticks = m.ticks
    await until(lambda: m.ticks >= ticks + 2, what="the manager loop to go round")


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.clock = FakeClock()
        self.challenges = ChallengeStore()
        self.tls = TLSManager(CertStore(tmp_path / "state" / "tls"), DOMAIN)
        self.server = SimpleNamespace(challenges=self.challenges, tls=self.tls, https_port=0)
        self.driver = FakeDriver(tmp_path, self.clock)
        self.runner: web.AppRunner | None = None
        self.managers: list[CertManager] = []

    async def start_http(self) -> int:
        self.runner = web.AppRunner(make_http_app(self.challenges, DOMAIN))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def manager(self, cfg: config_mod.Config) -> CertManager:
        self.tls.load()
        m = CertManager(cfg, self.server, driver=self.driver,  # type: ignore[arg-type]
                        clock=lambda: self.clock.wall, monotonic=lambda: self.clock.mono, rng=lambda: 0.5)
        m.probe_s = 0.02
        m.self_check_window_s = 0.3
        await m.start()
        self.managers.append(m)
        return m

    async def close(self) -> None:
        for m in self.managers:
            await m.aclose()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        await harness.close()


async def issued_once(h: Any, caplog: Any) -> tuple[Any, int]:
    """A manager (checks once a day) that has obtained its first certificate and gone quiet; its serial."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    cfg = make_cfg(h.tmp, await h.start_http(), check_interval_s=DAY)
    m = await h.manager(cfg)
    await until(lambda: m.attempts == 1 and not h.tls.info.self_signed, what="first issuance")
    await settle(m)
    return m, h.tls.info.serial


async def test_clock_jumps_forward_and_back(h, caplog):
    """F12: obtain at start; +1 h wall jump (no monotonic advance) -> detected, one extra check, nothing due;
    +100 d -> "expired according to the local clock" -> renewal at once; -2 d -> NotBefore is in the
    "future": keep serving, check once, no renewal loop."""
    m, first = await issued_once(h, caplog)

    checks = m.checks
    h.clock.wall += 3600
    await until(lambda: m.checks == checks + 1, what="a check after the +1 h jump")
    assert "wall clock moved +3600 s" in caplog.text and m.attempts == 1
    await settle(m)

    h.clock.wall += 100 * DAY
    await until(lambda: m.attempts == 2 and h.tls.info.serial != first, what="renewal after +100 d")
    assert "certificate expired according to the local clock" in caplog.text
    renewed = h.tls.info.serial
    await settle(m)

    checks, ticks = m.checks, m.ticks
    h.clock.wall -= 2 * DAY
    await until(lambda: m.checks == checks + 1 and m.ticks > ticks + 20, what="probes after the -2 d jump")
    assert "wall clock moved -172800 s" in caplog.text
    assert m.attempts == 2 and h.tls.info.serial == renewed        # still served, no renewal loop
    assert m.status()["next_action"] == "wait"


async def test_certificate_expired_on_arrival_backs_off(h, caplog):
    """F12 as libfaketime showed it: our clock jumps +100 d, the CA's does not, so every new certificate is
    already expired for us. Each one is served, logged as an ERROR naming the local clock and counted as a
    failure: one order, then the next only after 1 min, then after 10 min (it looped at 2 orders/s)."""
    m, first = await issued_once(h, caplog)

    h.clock.wall += 100 * DAY
    h.driver.skew_s = -100 * DAY
    await until(lambda: m.attempts == 2 and m.state.failures == 1, what="the renewal after +100 d")
    assert h.tls.info.serial != first                                   # served all the same
    line = next(r for r in caplog.records if "already expired according to the local clock" in r.getMessage())
    assert line.levelno == logging.ERROR and "the local clock is probably wrong; retry in 1m" in line.getMessage()
    ticks = m.ticks
    await until(lambda: m.ticks > ticks + 50, what="the manager to go round its loop")
    assert h.driver.orders == 2 and m.status()["next_action"] == "wait"

    h.clock.wall += 61
    await until(lambda: m.attempts == 3 and m.state.failures == 2, what="the retry after 1 min")
    assert "retry in 10m" in caplog.records[-1].getMessage()
    ticks = m.ticks
    await until(lambda: m.ticks > ticks + 50, what="the manager to go round its loop")
    assert h.driver.orders == 3

    h.driver.skew_s = 0.0                                               # the clocks agree again
    h.clock.wall += 601
    await until(lambda: m.attempts == 4 and m.state.failures == 0, what="a good certificate after 10 min")
    assert not m.status()["last_error"]


async def test_streak_ends_when_the_clock_is_right_again(h, caplog):
    """After certificates looked expired on arrival (clock +100 d), the user fixes the clock: the served
    certificate is valid and not due, so the failure streak is cleared at the next check (status healthy
    again) without another order -- not two months later at the next success."""
    m, _ = await issued_once(h, caplog)
    h.clock.wall += 100 * DAY
    h.driver.skew_s = -100 * DAY
    await until(lambda: m.attempts == 2 and m.state.failures == 1, what="the renewal after +100 d")
    await settle(m)
    assert m.status()["last_error"]

    h.clock.wall -= 100 * DAY                                           # the clock is fixed
    await until(lambda: m.state.failures == 0, what="the streak to be cleared")
    assert "no longer matter" in caplog.text and not m.status()["last_error"]
    assert h.driver.orders == 2 and m.attempts == 2


async def test_unexpected_error_in_an_attempt_backs_off(h, caplog):
    """An exception the driver does not translate (libfaketime made time.sleep raise OSError EINVAL in the
    ACME thread) is a failed attempt with backoff: one line, no second order within the minute."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    cfg = make_cfg(h.tmp, await h.start_http(), check_interval_s=DAY)
    h.driver.errors = [OSError(22, "Invalid argument")]
    m = await h.manager(cfg)
    await until(lambda: m.attempts == 1 and m.state.failures == 1, what="the failed attempt")
    ticks = m.ticks
    await until(lambda: m.ticks > ticks + 50, what="the manager to go round its loop")
    assert h.driver.orders == 1
    assert "obtaining a certificate failed: unexpected error: OSError: [Errno 22] Invalid argument; retry in 1m" \
        in caplog.text
    h.clock.wall += 61
    await until(lambda: not h.tls.info.self_signed and m.state.failures == 0, what="issuance after the backoff")
    assert h.driver.orders == 2


async def test_failure_backoff_persists_across_restart(h, caplog):
    """F6 (restart part): a failed attempt is one line (what, next try, what is served); the streak is in
    the state file; a new manager does not retry before the backoff has elapsed, then succeeds."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    cfg = make_cfg(h.tmp, await h.start_http())
    h.driver.errors = [AcmeError(f"cannot reach ACME server {DIRECTORY}: connection refused")]
    m1 = await h.manager(cfg)
    await until(lambda: m1.attempts == 1 and m1.state.failures == 1, what="a failed attempt")
    line = next(r for r in caplog.records if "obtaining a certificate failed" in r.getMessage())
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"obtaining a certificate failed: cannot reach ACME server {DIRECTORY}: "
                                        "connection refused; retry in 1m (at ")
    assert "serving a self-signed certificate meanwhile" in line.getMessage()
    await m1.aclose()
    h.managers.remove(m1)
    assert StateFiles(cfg).load_state().failures == 1

    m2 = await h.manager(cfg)
    await until(lambda: m2.checks >= 1 and m2.ticks > 20, what="the restarted manager to tick")
    assert m2.attempts == 0 and h.driver.orders == 1                   # backoff survived the restart
    assert m2.status()["failures"] == 1 and "connection refused" in m2.status()["last_error"]
    h.clock.wall += 61
    await until(lambda: not h.tls.info.self_signed and StateFiles(cfg).load_state().failures == 0,
                what="issuance after the backoff, recorded in the state file")
    assert m2.attempts == 1


async def test_retry_after_holds_even_forced_renewals(h, caplog):
    """F7's rule: after 429 + Retry-After 120, not even ``cert renew --force`` orders before 120 s."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    cfg = make_cfg(h.tmp, await h.start_http())
    h.driver.errors = [RateLimited(f"rate-limited by ACME server {DIRECTORY} at newOrder: slow down", 120.0)]
    m = await h.manager(cfg)
    await until(lambda: m.state.failures == 1, what="the rate-limited attempt")
    assert "rate-limited by ACME server" in caplog.text and "next attempt at " in caplog.text
    checks = m.checks
    h.clock.wall += 100
    m.request_check(force=True)
    await until(lambda: m.checks > checks, what="the forced check")
    assert h.driver.orders == 1
    h.clock.wall += 21
    await until(lambda: not h.tls.info.self_signed, what="issuance after Retry-After")
    assert h.driver.orders == 2


@pytest.mark.parametrize("answer", ["refused", "404"])
async def test_broken_public_path_places_no_order(h, caplog, answer):
    """F13: the self-probe does not come back -> one line naming the public path, no ACME order."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    if answer == "refused":
        port = free_port()
    else:  # something else answers port 80 (another web server on the relay)
        async def not_found(request: web.Request) -> web.Response:
            return web.Response(status=404)

        other = web.Application()
        other.router.add_route("*", "/{tail:.*}", not_found)
        runner = web.AppRunner(other)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        m = await h.manager(make_cfg(h.tmp, port))
        await until(lambda: m.state.failures == 1, what="the failed self-check")
    finally:
        if answer != "refused":
            await runner.cleanup()
    assert h.driver.orders == 0 and h.challenges.get("x") is None and len(h.challenges) == 0
    assert f"public path http://{DOMAIN}/ does not reach this laptop (" in caplog.text
    assert "not requesting a certificate; retry in 15s" in caplog.text
    expected = "failed (connection refused)" if answer == "refused" else "answered HTTP 404"
    assert expected in caplog.text


async def test_served_certificate_serial_reads_a_fresh_handshake(tmp_path):
    tls = TLSManager(CertStore(tmp_path / "tls"), DOMAIN)
    tls.load()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=tls.listening_context)
    try:
        port = server.sockets[0].getsockname()[1]
        assert await served_certificate_serial("127.0.0.1", port, DOMAIN) == tls.info.serial
    finally:
        server.close()
        await server.wait_closed()


async def test_ari_window_moves_renewal_early_and_the_order_replaces_the_old_certificate(h, caplog):
    """With a CA that offers ARI: after issuance the manager asks renewalInfo for the certificate, picks a
    time in the suggested window (rng 0.5 -> its middle), renews there -- long before 2/3 of the lifetime --
    and sends ``replaces`` with the old certificate's ARI id."""
    caplog.set_level(logging.INFO, "inverse_cloud.certs.manager")
    cfg = make_cfg(h.tmp, await h.start_http())
    now = dt.datetime.fromtimestamp(h.clock.wall, dt.UTC)
    h.driver.ari = AriWindow(now + dt.timedelta(days=5), now + dt.timedelta(days=7))
    m = await h.manager(cfg)
    await until(lambda: m.attempts == 1 and not h.tls.info.self_signed, what="first issuance")
    first = h.tls.info.serial
    await settle(m)
    await until(lambda: m.state.ari_time is not None, what="the ARI choice")
    assert m.state.ari_time == now + dt.timedelta(days=6)
    assert m.status()["next_renewal"] == (now + dt.timedelta(days=6)).isoformat()
    assert "the CA suggests renewing between" in caplog.text
    old_id = ari_cert_id(x509.load_pem_x509_certificates((h.tls.info.path / "fullchain.pem").read_bytes())[0])
    assert h.driver.ari_asked == [old_id]

    h.clock.wall += 6 * DAY - 60          # just before the chosen time
    h.clock.mono += 6 * DAY - 60          # (no jump: the clocks moved together, as in a running laptop)
    await settle(m)
    assert m.attempts == 1
    h.clock.wall += 61
    h.clock.mono += 61
    await until(lambda: h.tls.info.serial != first, what="the ARI-timed renewal")
    assert h.driver.replaces == ["", old_id]
