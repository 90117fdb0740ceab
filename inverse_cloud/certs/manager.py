"""The certificate manager component: obtains and renews the domain's certificate while ``serve`` runs.

Loop (all on the event loop; ACME and DNS run in threads):

* a short probe tick (``min(check_interval_s, 10 s)``, monotonic) compares how far the wall clock and the
  monotonic clock advanced: a difference means suspend/resume or a clock change, and triggers a check at
  once (a laptop's monotonic timers stop while the lid is shut);
* a full check at least every ``[acme] check_interval_s`` of wall-clock time, and whenever the decision's
  due time (wall clock) has passed: refresh ARI if due, then :func:`certs.decide`;
* when due: public-path self-check, order (acme_client), store atomically, hot-swap, then prove that a fresh
  TLS handshake to our own listener presents the new serial;
* failures are one log line each (what, next try, how long the current certificate lasts), the streak is
  persisted in ``state_dir``/acme-state.json; serving never stops; a certificate already expired by the local
  clock when it arrives (clock far ahead) is served but counts as a failure, so the backoff bounds the orders;
* CAA is looked up at start and once a day (and after the first issuance): WARNING while it does not pin
  our account.

``inverse-cloud cert renew`` talks to a running manager through a request file plus SIGHUP (the pid is in
the lock file ``state_dir``/acme.lock, held while the manager runs, also by a stand-alone ``cert renew``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from cryptography import x509

from inverse_cloud.certs import caa
from inverse_cloud.certs.acme_base import ChallengeAnswers
from inverse_cloud.certs.acme_client import AcmeDriver
from inverse_cloud.certs.policy import (
    RenewalState,
    Validity,
    aware,
    choose_in_window,
    decide,
    failure_level,
    failures_are_moot,
    human_duration,
    next_attempt_at,
)
from inverse_cloud.certs.policy import ari_cert_id as _ari_cert_id
from inverse_cloud.certs.probe import check_public_path, choose_challenge, served_certificate_serial
from inverse_cloud.certs.state import StateFiles
from inverse_cloud.certs.store import TLSManager
from inverse_cloud.config import Config
from inverse_cloud.errors import AcmeError, CertStoreError, ConfigError, InverseCloudError, RateLimited

__all__ = ["CertManager", "CertTarget", "ChallengeAnswers", "StateFiles", "check_public_path",
           "served_certificate_serial"]

log = logging.getLogger(__name__)

JUMP_TOLERANCE_S = 30.0      # wall vs monotonic drift beyond this is a suspend/resume or a clock change
CAA_INTERVAL_S = 86400.0     # a CAA record changes rarely: once a day is enough to notice


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _fmt(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


class CertTarget(Protocol):
    """What the manager serves certificates through: the DAV server, or ``cert renew``'s stand-alone
    listener. ``https_port`` 0 means: do not verify the served certificate with a fresh handshake."""

    @property
    def challenges(self) -> ChallengeAnswers: ...

    @property
    def tls(self) -> TLSManager: ...

    @property
    def https_port(self) -> int: ...


class CertManager:
    """Supervisor component. ``server`` provides ``challenges``, ``tls`` (TLSManager) and ``https_port``
    (0: do not verify the served certificate, e.g. a stand-alone ``cert renew``)."""

    name = "cert-manager"

    def __init__(self, cfg: Config, server: CertTarget, *, driver: AcmeDriver | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.server = server
        self.domain = cfg.server.domain
        self.files = StateFiles(cfg)
        self.driver = driver or AcmeDriver(cfg.acme, self.domain)
        self.clock, self.monotonic, self.rng = clock, monotonic, rng
        self.state = RenewalState()
        self.probe_s = min(cfg.acme.check_interval_s, 10.0)
        self.issuer = caa.issuer_domain_for(cfg.acme.directory, cfg.acme.caa_issuer)
        self._lock_fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._force = False
        self._retry_now = False
        self._due_at: float | None = None
        self._busy = False
        self._ari_offered: bool | None = None
        self._ari_retry_at: dt.datetime | None = None
        self._account = ""
        self._lock_warned = False
        self._next_caa = 0.0
        self._caa_task: asyncio.Task[caa.CaaVerdict] | None = None
        self._state_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cert-state")
        self.self_check_window_s = 10.0   # how long connection refusals are retried (tunnel coming up)
        self.ticks = 0         # loop iterations, full checks, attempts (self-check + order): for tests and status
        self.checks = 0
        self.attempts = 0

    # --- component protocol ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.state = await loop.run_in_executor(None, self.files.load_state)
        self._account = await loop.run_in_executor(None, self.driver.accounts.account_uri, self.cfg.acme.directory)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="cert-manager")

    async def aclose(self) -> None:
        for task in (self._task, self._caa_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._caa_task = None
        with contextlib.suppress(OSError):
            await self._save()  # what a cancelled check had recorded in memory
        self._state_executor.shutdown(wait=True)
        await self.driver.aclose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reload(self) -> None:
        """SIGHUP: pick up a ``cert renew`` request (request file) and check now."""
        try:
            req = json.loads(self.files.request.read_text(encoding="utf-8"))
            self.files.request.unlink()
            self._force = self._force or bool(req.get("force"))
            self._retry_now = True
            log.info("certificate check requested (cert renew%s)", " --force" if req.get("force") else "")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("renew request %s unreadable (%s); checking anyway", self.files.request, exc)
        if self._wake is not None:
            self._wake.set()

    def request_check(self, force: bool = False) -> None:
        """The user's early retry (``cert renew``): skip our backoff (never the CA's Retry-After)."""
        self._force = self._force or force
        self._retry_now = True
        if self._wake is not None:
            self._wake.set()

    def status(self) -> dict[str, Any]:
        now = utc(self.clock())
        info = getattr(self.server.tls, "info", None)
        validity = self._validity()
        s = self.state
        level = failure_level(validity, now, s.failures) if s.failures else logging.INFO
        caa_ok = s.caa_state == "ok"
        record = caa.recommended_record(self.domain, self.issuer, self._account, self.cfg.acme.caa_methods) if (
            self.issuer and self._account) else ""
        return {
            "state": "renewing" if self._busy else ("failing" if s.failures else "ok"),
            "healthy": level < logging.ERROR,
            "serial": info.serial_hex if info else "",
            "self_signed": bool(info.self_signed) if info else None,
            "not_after": info.not_after.isoformat() + "Z" if info else "",
            "next_renewal": s.next_renewal_at.isoformat() if s.next_renewal_at else "",
            "next_action": s.next_action,
            "last_error": s.last_error,
            "failures": s.failures,
            "last_success": s.last_success_at.isoformat() if s.last_success_at else "",
            "account": self._account,
            "directory": self.cfg.acme.directory,
            "caa": {"state": s.caa_state or "not checked", "ok": caa_ok, "detail": s.caa_detail,
                    "checked_at": s.caa_checked_at.isoformat() if s.caa_checked_at else "", "record": record},
        }

    # --- loop ------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        last_wall, last_mono = self.clock(), self.monotonic()
        next_check = 0.0
        self._next_caa = 0.0   # at start (a user who just published the record restarts to see it), then daily
        while True:
            self.ticks += 1
            wall, mono = self.clock(), self.monotonic()
            drift = (wall - last_wall) - (mono - last_mono)
            last_wall, last_mono = wall, mono
            woke = self._wake.is_set()
            self._wake.clear()
            jumped = abs(drift) > JUMP_TOLERANCE_S
            if jumped:
                log.info("wall clock moved %+.0f s against the monotonic clock (suspend/resume or clock change); "
                         "checking the certificate now", drift)
                if drift < 0:
                    self._next_caa = min(self._next_caa, wall)  # not a day + the jump until the next CAA check
            if woke or jumped or wall >= next_check or (self._due_at is not None and wall >= self._due_at):
                try:
                    await self.check()
                except Exception as exc:  # boundary: the manager must survive anything and keep serving
                    log.error("certificate check failed unexpectedly: %s", exc, exc_info=True)
                    self._due_at = None  # next regular check, not at once: a failing check must not spin
                next_check = self.clock() + self.cfg.acme.check_interval_s
            if self.clock() >= self._next_caa and (self._caa_task is None or self._caa_task.done()):
                # In its own task: a slow resolver must not delay renewals.
                self._caa_task = asyncio.create_task(self.check_caa(), name="cert-manager-caa")
                self._next_caa = self.clock() + CAA_INTERVAL_S
            wall = self.clock()
            timeout = min(self.probe_s, max(0.0, next_check - wall))
            if self._due_at is not None:
                timeout = min(timeout, max(0.0, self._due_at - wall))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.01))

    def _validity(self) -> Validity | None:
        info = getattr(self.server.tls, "info", None)
        if info is None or info.self_signed or self.domain not in info.names:
            return None
        return Validity(info.serial_hex, aware(info.not_before), aware(info.not_after))

    def _lock(self) -> bool:
        if self._lock_fd is None:
            self._lock_fd = self.files.try_lock()
            if self._lock_fd is None:
                if not self._lock_warned:
                    holder = self.files.holder()
                    log.warning("another process (pid %s) is obtaining a certificate for this installation; "
                                "waiting for it", holder[0] if holder else "?")
                    self._lock_warned = True
                return False
        return True

    async def check(self) -> None:
        """One full check: ARI refresh (if due), decision, and an attempt when due."""
        self.checks += 1
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._lock):
            self._due_at = self.clock() + self.probe_s
            return
        force, self._force = self._force, False
        retry_now, self._retry_now = self._retry_now, False
        now = utc(self.clock())
        validity = self._validity()
        if validity is not None and not validity.is_expired(now):
            await self._refresh_ari(validity, now)
        if failures_are_moot(validity, now, self.state):
            assert validity is not None
            log.info("certificate %s is valid until %s and not due for renewal: the %d failed attempt(s) before "
                     "no longer matter (last: %s)", validity.serial_hex, _fmt(validity.not_after),
                     self.state.failures, self.state.last_error)
            self.state.clear_failures()
        decision = decide(validity, now, self.state, force=force, retry_now=retry_now)
        self._note_decision(decision.at if not decision.is_due else now, decision.action)
        if decision.is_due:
            if validity is not None and validity.is_expired(now):
                log.warning("certificate expired according to the local clock (valid until %s); renewing now",
                            _fmt(validity.not_after))
            await self._attempt(decision.action, decision.reason, validity)
            validity, now = self._validity(), utc(self.clock())
            if validity is not None and not validity.is_expired(now):
                await self._refresh_ari(validity, now)  # a new certificate gets its ARI window at once
            decision = decide(validity, now, self.state)
            self._note_decision(decision.at, decision.action)
        self.state.last_check_at = utc(self.clock())
        await self._save()

    def _note_decision(self, at: dt.datetime, action: str) -> None:
        self.state.next_renewal_at = at
        self.state.next_action = action
        self._due_at = at.timestamp()

    async def _refresh_ari(self, validity: Validity, now: dt.datetime) -> None:
        s = self.state
        if self._ari_offered is False or (self._ari_retry_at is not None and now < self._ari_retry_at) or (
                s.ari_serial == validity.serial_hex and s.ari_next_fetch and now < s.ari_next_fetch):
            return
        info = self.server.tls.info
        if info is None:   # nothing served yet: nothing to ask renewal information about
            return
        try:
            if self._ari_offered is None:
                self._ari_offered = await self.driver.supports_ari()
                if not self._ari_offered:
                    return
            pem = await asyncio.get_running_loop().run_in_executor(None, (info.path / "fullchain.pem").read_bytes)
            cert_id = _ari_cert_id(x509.load_pem_x509_certificates(pem)[0])
            window, retry_s = await self.driver.renewal_info(cert_id)
        except (OSError, ValueError, InverseCloudError) as exc:
            # "We want to stop errors around ARI preventing renewal" (certbot): fall back to the lifetime rule.
            log.info("renewal info (ARI) unavailable: %s; using the certificate's lifetime", exc)
            self._ari_retry_at = now + dt.timedelta(hours=1)
            return
        if window is None:
            self._ari_offered = False
            return
        self._ari_offered = True
        if s.ari_serial != validity.serial_hex or (s.ari_start, s.ari_end) != (window.start, window.end):
            s.ari_time = choose_in_window(window, self.rng())
            log.info("the CA suggests renewing between %s and %s (ARI); chose %s", _fmt(window.start),
                     _fmt(window.end), _fmt(s.ari_time))
        s.ari_serial, s.ari_start, s.ari_end = validity.serial_hex, window.start, window.end
        wait = min(max(retry_s if retry_s is not None else 6 * 3600.0, 60.0), 86400.0)
        s.ari_next_fetch = now + dt.timedelta(seconds=wait)

    # --- one attempt -----------------------------------------------------------------------------------

    async def _attempt(self, action: str, reason: str, validity: Validity | None) -> None:
        self._busy = True
        self.attempts += 1
        started = self.monotonic()
        nonces_before = getattr(self.driver, "bad_nonces", 0)
        verb = "obtaining" if action == "obtain" else "renewing"
        try:
            log.info("%s a certificate for %s (%s)", verb, self.domain, reason)
            method, problem = await choose_challenge(self.cfg.acme, self.domain, self.server.challenges,
                                                     self.server.tls.alpn, self.self_check_window_s)
            if problem is not None:
                await self._fail(f"{problem}; not requesting a certificate", "path", validity)
                return
            replaces = ""
            if validity is not None and self._ari_offered and self.state.ari_serial == validity.serial_hex:
                replaces = await self._cert_id()
            try:
                issued = await self.driver.issue(self.server.challenges, alpn=self.server.tls.alpn, method=method,
                                                 replaces=replaces)
            except RateLimited as exc:
                await self._fail(str(exc), "ca", validity, exc.retry_after_s)
                return
            except (AcmeError, ConfigError) as exc:
                await self._fail(str(exc), "ca", validity)
                return
            if self._account != self.driver.accounts.account_uri(self.cfg.acme.directory):
                self._account = self.driver.accounts.account_uri(self.cfg.acme.directory)
                self._next_caa = 0.0  # the record to check names the account: check it now
            try:
                serial = await self._install(issued.chain_pem, issued.key_pem)
            except InverseCloudError as exc:
                await self._fail(f"the new certificate could not be put in service: {exc}", "ca", validity)
                return
            info = self.server.tls.info
            assert info is not None   # _install() just set it
            nonces = getattr(self.driver, "bad_nonces", 0) - nonces_before
            log.info("certificate %s: serial %x valid until %s; %s (%.2f s%s)",
                     "obtained" if action == "obtain" else "renewed", serial, _fmt(aware(info.not_after)),
                     "a fresh handshake to our listener presents it" if self.server.https_port else "stored",
                     self.monotonic() - started, f"; {nonces} badNonce answer(s) retried" if nonces else "")
            now = utc(self.clock())
            if aware(info.not_after) <= now:
                # Served (clients with a right clock accept it), but no success: the streak goes on and the
                # backoff grows, instead of ordering again at once (F12: 2 orders/s with the clock 100 d ahead).
                await self._fail(f"the certificate just issued (valid {_fmt(aware(info.not_before))} to "
                                 f"{_fmt(aware(info.not_after))}) is already expired according to the local clock "
                                 f"({_fmt(now)}): the local clock is probably wrong", "ca", self._validity())
                return
            self.state.record_success(now, format(serial, "x"))
            await self._save()
        except Exception as exc:  # boundary: e.g. an OSError from the ACME thread; raising would order again at once
            log.debug("certificate attempt failed unexpectedly", exc_info=True)
            await self._fail(f"unexpected error: {type(exc).__name__}: {exc}", "ca", validity)
        finally:
            self._busy = False

    async def _cert_id(self) -> str:
        info = self.server.tls.info
        if info is None:
            return ""
        try:
            pem = await asyncio.get_running_loop().run_in_executor(None, (info.path / "fullchain.pem").read_bytes)
            return _ari_cert_id(x509.load_pem_x509_certificates(pem)[0])
        except (OSError, ValueError):
            return ""

    async def _install(self, chain_pem: bytes, key_pem: bytes) -> int:
        """Store, swap, and prove: the served serial must be the new one.

        :raises CertStoreError: storing or swapping failed, or the listener still presents another serial.
        """
        tls = self.server.tls
        serial = int(x509.load_pem_x509_certificates(chain_pem)[0].serial_number)
        loop = asyncio.get_running_loop()

        def store_and_swap() -> None:
            tls.store.save(chain_pem, key_pem)
            tls.load()
            with contextlib.suppress(OSError):
                tls.store.prune(keep=3)

        await loop.run_in_executor(None, store_and_swap)
        if tls.info is None or tls.info.serial != serial:
            raise CertStoreError(f"stored serial {serial:x} but the TLS manager kept serving another certificate")
        port = self.server.https_port
        if port:
            host = self.cfg.server.https_listen[0]
            served = await served_certificate_serial(host, port, self.domain)
            if served != serial:
                raise CertStoreError(f"a fresh handshake to {host}:{port} presents serial {served:x}, "
                                     f"not the new {serial:x}")
        return serial

    async def _save(self) -> None:
        # One writer thread: saves land in the order they were made (the CAA task saves too).
        await asyncio.get_running_loop().run_in_executor(self._state_executor, self.files.save_state,
                                                         self.state.copy())

    async def _fail(self, error: str, kind: str, validity: Validity | None,
                    retry_after_s: float | None = None) -> None:
        """Record (and persist at once: a crash must not lose the streak) and log one line."""
        now = utc(self.clock())
        self.state.record_failure(now, error, "path" if kind == "path" else "ca", retry_after_s)
        nxt = next_attempt_at(self.state, now) or now
        if validity is None:
            current = "serving a self-signed certificate meanwhile (phones will not connect)"
        elif validity.is_expired(now):
            current = f"the current certificate EXPIRED at {_fmt(validity.not_after)}"
        else:
            current = (f"current certificate valid until {_fmt(validity.not_after)} "
                       f"({human_duration(validity.remaining(now).total_seconds())} left)")
        what = "" if kind == "path" else ("obtaining a certificate failed: " if validity is None
                                          else "certificate renewal failed: ")
        wait = human_duration((nxt - now).total_seconds())
        when = f"next attempt at {_fmt(nxt)} (in {wait})" if retry_after_s else f"retry in {wait} (at {_fmt(nxt)})"
        log.log(failure_level(validity, now, self.state.failures), "%s%s; %s; %s", what, error, when, current)
        await self._save()

    # --- CAA -------------------------------------------------------------------------------------------

    async def check_caa(self) -> caa.CaaVerdict:
        # In a child process: dnspython's modules would otherwise stay in this long-lived process for good.
        # A resolver timing out holds up neither shutdown nor renewals (the task is cancelled, the child killed).
        verdict = await caa.lookup_caa_isolated(self.domain, self.issuer, self._account, self.cfg.acme.dns_server,
                                                method=self.cfg.acme.caa_methods)
        s = self.state
        changed = (s.caa_state, s.caa_detail) != (verdict.state, verdict.detail)
        s.caa_state, s.caa_detail, s.caa_checked_at = verdict.state, verdict.detail, utc(self.clock())
        if verdict.state == "ok":
            (log.info if changed else log.debug)("CAA for %s: %s", self.domain, verdict.detail)
        elif verdict.state == "unknown" and not self._account:
            log.info("CAA for %s not checked yet: %s", self.domain, verdict.detail)
        elif verdict.state == "unknown":
            log.warning("CAA for %s could not be checked: %s; trying again in a day", self.domain, verdict.detail)
        else:
            record = caa.recommended_record(self.domain, self.issuer, self._account, self.cfg.acme.caa_methods)
            fix = (f"; publish: {record}"
                   if self.issuer and self._account else "; see: inverse-cloud cert caa")
            log.warning("CAA for %s: %s (%s): the relay could obtain a certificate for this name%s",
                        self.domain, verdict.state, verdict.detail, fix)
        await self._save()
        return verdict

