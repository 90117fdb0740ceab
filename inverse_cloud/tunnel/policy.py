"""The tunnel's decisions, pure: how long to wait before the next attempt, and what an error means.

No I/O and no clock here; :mod:`inverse_cloud.tunnel.link` acts on the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncssh

from inverse_cloud.errors import AuthRejected, ConfigError, ForwardRefused, HostKeyMismatch, TunnelError

__all__ = ["BACKOFF_S", "FORWARD_REFUSED_RETRY_S", "SLOW_RETRY_S", "Failure", "classify", "describe_lost",
           "lost_reason", "retry_delay", "ssh_ports", "tries_next_port"]

# Reconnect schedule after consecutive transient failures (seconds, before jitter). The first retry comes
# within a second (a dropped link should cost a phone seconds, not minutes); the cap keeps a long outage
# from turning into hour-long gaps once the network is back.
BACKOFF_S: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 60)
# Errors retrying cannot fix (host key changed, key rejected): a human must act; retry rarely so that
# the fix (e.g. relay-setup on the relay) is picked up without a restart.
SLOW_RETRY_S = 300.0
# Listen still refused right after a takeover: a permitlisten/PermitListen mismatch, or another laptop.
FORWARD_REFUSED_RETRY_S = 60.0


def retry_delay(attempt: int, kind: str, rand: float) -> float:
    """Seconds to wait before the next connection attempt (pure).

    :param attempt: consecutive failures so far, counting from 0
    :param kind: ``transient`` | ``refused`` | ``fatal`` (see :class:`Failure`)
    :param rand: a number in [0, 1): half of each delay is fixed, half is jitter
    """
    if kind == "fatal":
        base = SLOW_RETRY_S
    elif kind == "refused":
        base = FORWARD_REFUSED_RETRY_S
    else:
        base = BACKOFF_S[min(max(attempt, 0), len(BACKOFF_S) - 1)]
    return base * (0.5 + 0.5 * rand)


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, in one line. ``kind`` chooses the retry schedule: ``transient`` (network),
    ``refused`` (listen refused after a takeover) or ``fatal`` (a human must act)."""

    kind: str
    message: str


def classify(exc: BaseException, *, relay: str, expected_fp: str, offered_fp: str | None, key_file: Path,
             user: str) -> Failure:
    """Turn an exception from connecting/forwarding into a :class:`Failure` (pure)."""
    if isinstance(exc, HostKeyMismatch | AuthRejected):
        return Failure("fatal", str(exc))
    if isinstance(exc, ForwardRefused):
        return Failure("refused", str(exc))
    if isinstance(exc, ConfigError):
        return Failure("fatal", str(exc))
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        got = offered_fp or "a key that could not be read"
        return Failure("fatal", f"relay host key changed: expected {expected_fp}, got {got}; if you rebuilt the "
                                "relay run `inverse-cloud relay-setup --accept-new-host-key`")
    if isinstance(exc, asyncssh.KeyExchangeFailed) and "host key" in str(exc).lower():
        return Failure("fatal", f"relay host key changed: expected {expected_fp}, but the relay offers no host key "
                                "of that type; if you rebuilt the relay run `inverse-cloud relay-setup "
                                "--accept-new-host-key`")
    if isinstance(exc, asyncssh.PermissionDenied):
        return Failure("fatal", f"relay {relay} refused our key {key_file} for user {user!r}; install "
                                f"{key_file}.pub on the relay (run `inverse-cloud relay-setup`)")
    if isinstance(exc, asyncssh.DisconnectError):
        return Failure("transient", f"relay closed the connection ({exc.reason or type(exc).__name__})")
    if isinstance(exc, TimeoutError):
        return Failure("transient", "timed out")
    if isinstance(exc, ConnectionRefusedError):
        return Failure("transient", "connection refused")
    if isinstance(exc, ConnectionResetError):
        return Failure("transient", "connection reset")
    if isinstance(exc, OSError):
        return Failure("transient", exc.strerror or str(exc) or type(exc).__name__)
    if isinstance(exc, TunnelError):
        return Failure("transient", str(exc))
    return Failure("transient", f"{type(exc).__name__}: {exc}")


def describe_lost(exc: Exception) -> str:
    """The reason a live link dropped, in a few words (pure)."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if "keepalive" in low or "timeout" in low or "timed out" in low:
        return "no answer to keepalives"
    if "reset" in low:
        return "connection reset"
    return text


def lost_reason(message: str) -> str:
    """The reason for a reconnect that status shows, from the message a dropped link was logged with
    (pure): ``keepalive timeout``, ``relay closed``, ``connection reset``, or the message itself."""
    low = message.lower()
    if "keepalive" in low:
        return "keepalive timeout"
    if "reset" in low:
        return "connection reset"
    if "closed" in low or "connection lost" in low or "disconnect" in low or "broken pipe" in low:
        return "relay closed"
    return message


def ssh_ports(primary: int, fallback: int, last_good: int | None) -> tuple[int, ...]:
    """The relay SSH ports to try, in order (pure): the one that worked last first (a laptop in a network
    that blocks port 22 does not pay a connect timeout on every reconnect), then the others.

    :param fallback: ``[relay] fallback_port``; 0 means none
    """
    ports = [primary] + ([fallback] if fallback and fallback != primary else [])
    if last_good in ports:
        ports.remove(last_good)
        ports.insert(0, last_good)
    return tuple(ports)


def tries_next_port(exc: BaseException) -> bool:
    """Whether a failed connection attempt is worth repeating on another relay port (pure): the network
    did not let an SSH session through (refused, unreachable, timed out, reset, cut before the key
    exchange). A relay that answered -- a host key or a refusal of our key -- is the relay on every port."""
    if isinstance(exc, HostKeyMismatch | AuthRejected | ConfigError | asyncssh.HostKeyNotVerifiable
                  | asyncssh.PermissionDenied):
        return False
    if isinstance(exc, asyncssh.KeyExchangeFailed):
        return "host key" not in str(exc).lower()
    return isinstance(exc, OSError | TimeoutError | asyncssh.DisconnectError)
