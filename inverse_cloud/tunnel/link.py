"""The SSH link to the relay: two reverse forwards (relay HTTPS/HTTP ports -> our listeners), kept up.

* One asyncssh connection with client keepalive on (asyncssh's default is off; a frozen link is otherwise
  never noticed, asyncssh#321), the relay's pinned host key as the ONLY trusted key (never
  ``known_hosts=None``, never ``~/.ssh/config`` or the agent), our one key.
* Reconnects forever in a background task, with capped exponential backoff and jitter
  (:data:`BACKOFF_S`); errors that retrying cannot fix (host key changed, key rejected, listen refused
  after a takeover) retry slowly, with one clear line. The local listeners keep serving throughout.
* A refused listen usually means the relay still holds the port for our previous, dead session (after a
  network change it keeps it until ClientAlive fires). We then end that session with the takeover key
  (see :mod:`inverse_cloud.tunnel.relay_files`) and reconnect at once.
* Each forwarded connection is handed to our listener over loopback TCP from a source port registered
  first (relay-seen client address -> REMOTE_ADDR): :mod:`inverse_cloud.tunnel.handoff`.
* ``TCP_QUICKACK`` is re-armed on the SSH socket after every read (Linux): otherwise a response of
  >= ~100 KB followed by the next request stalls ~40 ms (the relay's Nagle meets our delayed ACK).
  The byte-moving pieces live in :mod:`inverse_cloud.tunnel.channels`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from inverse_cloud.config import Config
from inverse_cloud.errors import ConfigError, ForwardRefused, TunnelError
from inverse_cloud.fsutil import check_private
from inverse_cloud.tunnel.admission import ChannelAdmission
from inverse_cloud.tunnel.channels import ForwardTarget, QuickAckConnector, quickack_supported
from inverse_cloud.tunnel.dial import RelayClient, dial
from inverse_cloud.tunnel.handoff import LocalHandoff
from inverse_cloud.tunnel.policy import (
    BACKOFF_S,
    FORWARD_REFUSED_RETRY_S,
    SLOW_RETRY_S,
    Failure,
    classify,
    describe_lost,
    lost_reason,
    retry_delay,
)
from inverse_cloud.tunnel.reach import PortChooser
from inverse_cloud.tunnel.watcher import LinkWatcher

__all__ = [
    "BACKOFF_S",
    "FORWARD_REFUSED_RETRY_S",
    "SLOW_RETRY_S",
    "Failure",
    "QuickAckConnector",
    "Tunnel",
    "classify",
    "quickack_supported",
    "retry_delay",
]

log = logging.getLogger(__name__)

# How long the takeover session may take (connect + forced command).
TAKEOVER_TIMEOUT_S = 15.0
# Receive window and largest packet we accept on a forwarded channel. The window stays asyncssh's 2 MiB (it
# bounds what one connection can make us buffer); packets up to 256 KiB instead of 32 KiB mean fewer
# per-packet decrypt/MAC calls in Python: relay->laptop throughput 150-270 -> ~316 MB/s in bench/tunnel_bench.py.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PACKET = 256 * 1024
# How long aclose() waits for the relay to confirm the forwards' cancellation and the close.
CLOSE_TIMEOUT_S = 2.0
# A link that stayed up this long is re-established at once when it drops (a flapping relay gets backoff).
STABLE_S = 5.0


# --- the component -----------------------------------------------------------------------------------

@dataclass
class _Forward:
    name: str
    relay_port: int
    host: str = "127.0.0.1"       # where on the relay: [relay] listen_host or listen_host6
    bound: bool = False
    listener: asyncssh.SSHListener | None = None


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


class Tunnel:
    """Supervisor component: keeps the relay's two reverse forwards up. ``start()`` never blocks serving."""

    name = "tunnel"

    def __init__(self, cfg: Config, target: ForwardTarget, *, quickack: bool = True,
                 wall_clock: Callable[[], float] = time.time, watcher: LinkWatcher | None = None) -> None:
        self.cfg = cfg
        self.relay = cfg.relay
        self.target = target
        self.quickack = quickack and quickack_supported()
        self._clock = wall_clock
        self._watcher = watcher
        self.tag = f"[relay={self.relay.host}:{self.relay.port}]"
        # listen_host6: the pair again on the relay's IPv6 address its ip6 NAT maps onto (relay_nat6.py)
        self.forwards = [_Forward(name, port, host) for host in (self.relay.listen_host, self.relay.listen_host6)
                         if host for name, port in (("https", self.relay.https_port), ("http", self.relay.http_port))]
        self.state = "down"
        self.connected_since: float | None = None
        self.reconnects: list[float] = []
        self.last_error: str | None = None
        self.host_key: asyncssh.SSHKey | None = None
        self.expected_fp = ""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._requested = False
        self._wake_reason: tuple[str, str] | None = None     # (status reason, log detail) of a requested drop
        self._down_reason: str | None = None
        self.last_reconnect: tuple[float, str] | None = None
        self._up_mono = 0.0
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connector: QuickAckConnector | None = None
        self._ever_up = False
        self._logged: tuple[str, str] | None = None
        self._took_over_logged = False
        self._v6_refused: tuple[str, int] | None = None      # the IPv6 forward refused (logged at ERROR once)
        self.attempts = 0
        self.takeovers = 0
        self.connections = 0
        self._admission = ChannelAdmission(cfg.server.max_connections, tag=self.tag)
        self.handoff = LocalHandoff(cfg, target, self._admission)
        self.ports = PortChooser(self.relay, self.tag, lambda exc: self._classify(exc).message)

    # -- lifecycle --

    async def start(self) -> None:
        if not self.relay.host_key:
            self._set_state("failed", "relay host key not pinned; run `inverse-cloud relay-setup`", logging.ERROR)
            return
        try:
            self.host_key = asyncssh.import_public_key(self.relay.host_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            self._set_state("failed", f"[relay] host_key in {self.cfg.path}: cannot be read ({exc}); run "
                                      "`inverse-cloud relay-setup --accept-new-host-key`", logging.ERROR)
            return
        self.expected_fp = f"{self.host_key.get_fingerprint('sha256')} ({self.host_key.get_algorithm()})"
        self.state = "connecting"
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="tunnel")
        if self._watcher is not None:
            await self._watcher.start(self)

    def reload(self) -> None:
        """SIGHUP (certificates and users re-read, `cert renew`): a healthy link is left alone -- dropping it
        would cut phones off and break the public path an ACME validation may be about to use; a link
        waiting out a backoff tries again now. A refused IPv6 pair is looked at (and reported) afresh on the
        next connection: the relay may have been changed."""
        self._v6_refused = None
        self.retry_now("SIGHUP")

    def retry_now(self, why: str) -> None:
        """A link waiting out a backoff tries again now (``why`` goes in the log line); a healthy link is left
        alone."""
        if self._wake is not None and self.state != "up" and not self._wake.is_set():
            log.info("%s retrying now (%s)", self.tag, why)
            self._wake.set()

    def reconnect(self) -> None:
        """SIGUSR1: re-establish the link now (for a network-change hook): drop a link that may be dead
        without waiting for keepalives, or skip the rest of a backoff wait."""
        self.reconnect_for("requested (SIGUSR1)", "SIGUSR1")

    def reconnect_for(self, reason: str, detail: str) -> None:
        """Drop the link now and reconnect without backoff (the link watcher's probe got no answer, or
        SIGUSR1); ``reason`` is what status shows as the last reconnect's reason."""
        if self._wake is not None:
            log.info("%s reconnecting now (%s)", self.tag, detail)
            self._wake_reason = (reason, detail)
            self._wake.set()

    async def aclose(self) -> None:
        self._closing = True
        if self._watcher is not None:
            await self._watcher.aclose()
        task, self._task = self._task, None
        # Cancel until done: asyncio.wait_for on 3.11 can swallow a cancellation that races with
        # completion (cpython#86296), so one cancel() is not always enough.
        for _ in range(50):
            if task is None or task.done():
                break
            task.cancel()
            await asyncio.wait([task], timeout=0.2)
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("%s tunnel task ended with %r", self.tag, task.exception())
        await self._close_conn()
        self.state = "down"

    async def _close_conn(self, graceful: bool = True) -> None:
        """Close the link. Graceful: cancel the forwards first (the relay stops accepting on its ports),
        then close, all within CLOSE_TIMEOUT_S (a dead link answers nothing). Otherwise abort at once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        listeners = [f.listener for f in self.forwards if f.listener is not None]
        for fwd in self.forwards:
            fwd.listener, fwd.bound = None, False
        if not graceful:
            conn.abort()
            return

        async def close() -> None:
            for listener in listeners:
                listener.close()
            await asyncio.gather(*(listener.wait_closed() for listener in listeners), return_exceptions=True)
            conn.close()
            await conn.wait_closed()

        try:
            await asyncio.wait_for(close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError, asyncssh.Error):
            conn.abort()

    @property
    def active_channels(self) -> int:
        return self.handoff.active_channels

    # -- state --

    def status(self) -> dict[str, Any]:
        now = self._clock()
        self.reconnects = [t for t in self.reconnects if now - t < 86400]
        local = {"https": self.target.https_port, "http": self.target.http_port}
        return {
            "state": self.state,
            "relay": f"{self.relay.host}:{self.relay.port}",
            "ssh_port": self.ports.in_use, "fallback": self.ports.on_fallback,
            "user": self.relay.user,
            "host_key_fingerprint": self.expected_fp or None,
            "connected_since": _iso(self.connected_since),
            "reconnects": [_iso(t) for t in self.reconnects],
            "last_error": self.last_error,
            "forwards": [{"name": f.name, "relay_port": f.relay_port, "relay_host": f.host,
                          "local_port": local[f.name], "bound": f.bound} for f in self.forwards],
            "takeovers": self.takeovers,
            "last_reconnect": None if self.last_reconnect is None else
            {"at": _iso(self.last_reconnect[0]), "reason": self.last_reconnect[1]},
            "network_watch": None if self._watcher is None else self._watcher.status(),
        }

    def _set_state(self, state: str, error: str | None, level: int) -> None:
        """Record the state; log only when (state, error) changes -- never once per retry."""
        self.state = state
        if error is not None and state != "up":
            self.last_error = error     # kept after recovery: status shows the last problem
        key = (state, error or "")
        if key != self._logged:
            self._logged = key
            log.log(level, "%s %s", self.tag, error if error else state)

    # -- the loop --

    async def _run(self) -> None:
        attempt = 0
        takeover_tried = False
        while not self._closing:
            try:
                await self._session(takeover_tried)
                attempt, takeover_tried = 0, False
                continue
            except _TakeOverNow:
                takeover_tried = True
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # boundary: every failure is classified, logged once, retried
                failure = self._classify(exc)
                takeover_tried = False
            delay = retry_delay(attempt, failure.kind, random.random())
            attempt += 1
            if self._requested:               # SIGUSR1 dropped the link on purpose: no backoff, no new line
                self._requested = False
                self.state, delay, attempt = "connecting", 0.0, 0
            elif failure.kind in ("fatal", "refused"):
                self._set_state("failed", failure.message, logging.ERROR)
            elif self.state == "up":
                self._down_reason = lost_reason(failure.message)
                self._set_state("down", f"relay link lost ({failure.message}); reconnecting", logging.WARNING)
                if time.monotonic() - self._up_mono >= STABLE_S:
                    delay, attempt = 0.0, 0       # a link that had been working: first retry at once
            elif self.state == "down":
                self.last_error = failure.message      # same outage: no new line per retry
            else:
                self._set_state("down", f"cannot reach relay ({failure.message}); retrying with backoff",
                                logging.WARNING)
            log.debug("%s next attempt in %.1f s (%s)", self.tag, delay, failure.message)
            await self._sleep_or_wake(delay)

    async def _sleep_or_wake(self, delay_s: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), delay_s)
        except TimeoutError:
            pass
        self._wake.clear()

    def _classify(self, exc: BaseException, key_file: Path | None = None) -> Failure:
        return classify(exc, relay=f"{self.relay.host}:{self.relay.port}", expected_fp=self.expected_fp,
                        offered_fp=None, key_file=key_file or self.relay.key_file, user=self.relay.user)

    async def _load_key(self, path: Path, what: str) -> asyncssh.SSHKey:
        def read() -> asyncssh.SSHKey:
            check_private(path, what)
            try:
                return asyncssh.read_private_key(str(path))
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                raise ConfigError(f"{what} {path} cannot be read: {exc}") from None

        return await asyncio.to_thread(read)

    async def _connect(self, key: asyncssh.SSHKey, port: int, *, keepalive: bool
                       ) -> tuple[asyncssh.SSHClientConnection, RelayClient]:
        assert self.host_key is not None
        self._connector = QuickAckConnector() if self.quickack and keepalive else None
        self.attempts += 1
        return await dial(self.relay, self.host_key, self.expected_fp, key, port=port, keepalive=keepalive,
                          connector=self._connector)

    async def _session(self, takeover_tried: bool) -> None:
        """One connection: connect, bind both forwards, serve until the link drops.

        :raises _TakeOverNow: the listen was refused and a takeover was done: reconnect at once.
        :raises ForwardRefused: the listen was refused even after a takeover.
        """
        key = await self._load_key(self.relay.key_file, "relay key")
        conn, client = await self.ports.connect(lambda port: self._connect(key, port, keepalive=True))
        self._conn = conn
        try:
            refused_fwd = await self._open_forwards(conn)
        except BaseException:
            await self._close_conn()
            raise
        v6_known = refused_fwd is not None and self._v6_refused == (refused_fwd.host, refused_fwd.relay_port)
        if refused_fwd is not None and (takeover_tried or v6_known) and refused_fwd.host != self.relay.listen_host:
            # Only IPv6 refused: the IPv4 pair bound, so no stale session holds the ports. One ERROR line per
            # change; the same refusal on a reconnect goes to DEBUG, with no takeover.
            log.log(logging.DEBUG if v6_known else logging.ERROR, "%s relay refused to listen on [%s]:%d: phones "
                    "on IPv6 cannot reach this laptop (apply `inverse-cloud relay-setup --ipv6` on the relay, or set "
                    "[relay] listen_host6 = \"\"); IPv4 works", self.tag, refused_fwd.host, refused_fwd.relay_port)
            self._v6_refused = (refused_fwd.host, refused_fwd.relay_port)
            refused_fwd = None
        elif refused_fwd is None:
            self._v6_refused = None
        if refused_fwd is not None:
            await self._close_conn()
            host, refused = (f"[{h}]" if ":" in (h := refused_fwd.host) else h), refused_fwd.relay_port
            if takeover_tried:
                raise ForwardRefused(
                    f"relay refused to listen on {host}:{refused} (check permitlisten in {self.relay.user}'s "
                    f"authorized_keys and PermitListen in its sshd Match block on the relay: they must name "
                    f"{host}:{refused} exactly, 'localhost' is not '127.0.0.1'; `inverse-cloud relay-setup` "
                    "prints them)")
            if not self._took_over_logged:
                self._took_over_logged = True
                log.warning("%s relay port %d still held by a previous session; taking over", self.tag, refused)
            await self._take_over()
            raise _TakeOverNow()
        # Up.
        now = self._clock()
        if self._ever_up:
            self.reconnects.append(now)
            self.last_reconnect = (now, self._down_reason or "unknown")
        self._ever_up = True
        self.connections += 1
        self.connected_since = now
        self._up_mono = time.monotonic()
        self._took_over_logged = False
        local = {"https": self.target.https_port, "http": self.target.http_port}
        self._set_state("up", "tunnel up: " + ", ".join(
            f"{f'[{f.host}]' if ':' in f.host else f.host}:{f.relay_port} -> local :{local[f.name]}"
            for f in self.forwards)
            + f" (relay host key {self.expected_fp})", logging.INFO)
        assert self._wake is not None
        self._wake.clear()
        self._wake_reason = None
        if self._watcher is not None:
            self._watcher.link_up(conn)
        closed = asyncio.ensure_future(conn.wait_closed())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([closed, woken], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # on cancellation (aclose) self._conn stays set: aclose closes it
            for fut in (closed, woken):
                fut.cancel()
            if self._watcher is not None:
                self._watcher.link_down()
        if woken.done() and not woken.cancelled() and not closed.done():
            self._wake.clear()
            await self._close_conn(graceful=False)     # the link may be dead: do not wait for answers
            self._requested = True
            self._down_reason = (self._wake_reason or ("requested", ""))[0]
            client.lost = TunnelError("reconnect requested")
        self.connected_since = None
        for fwd in self.forwards:
            fwd.bound, fwd.listener = False, None
        if self._conn is conn:
            self._conn = None
        reason = client.lost
        raise TunnelError(describe_lost(reason) if reason is not None else "relay closed the connection")

    async def _open_forwards(self, conn: asyncssh.SSHClientConnection) -> _Forward | None:
        """Bind every forward; return the first refused one (None if all bound)."""
        for fwd in self.forwards:
            try:
                fwd.listener = await conn.create_server(self.handoff.factory(fwd.name), fwd.host, fwd.relay_port,
                                                        window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PACKET)
            except asyncssh.ChannelListenError:   # NOT an asyncssh.Error subclass
                return fwd
            fwd.bound = True
        return None

    async def _take_over(self) -> None:
        """End the tunnel user's other sessions on the relay with the takeover key (its forced command)."""
        self.takeovers += 1
        try:
            key = await self._load_key(self.relay.takeover_key_file, "relay takeover key")
            conn, _ = await asyncio.wait_for(self.ports.connect(lambda p: self._connect(key, p, keepalive=False),
                                                                remember=False), TAKEOVER_TIMEOUT_S)
            async with conn:
                result = await asyncio.wait_for(conn.run("takeover", check=False), TAKEOVER_TIMEOUT_S)
            out = str(result.stdout or "").strip().splitlines()
            log.info("%s %s", self.tag, out[-1] if out else f"takeover exited with {result.exit_status}")
        except (OSError, asyncssh.Error, TimeoutError, ConfigError) as exc:
            failure = self._classify(exc, key_file=self.relay.takeover_key_file)
            log.warning("%s takeover of the stale session failed: %s; waiting for the relay to drop it "
                        "(ClientAlive)", self.tag, failure.message.replace("our key", "the takeover key"))


class _TakeOverNow(Exception):
    """Internal: a takeover was done, reconnect without waiting."""
