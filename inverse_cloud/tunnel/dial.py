"""Dialling the relay: one asyncssh connection that trusts the pinned host key only, with our one key.

Never ``known_hosts=None``, never ``~/.ssh/config`` or the agent, no X.509 defaults, no password,
keyboard-interactive or GSS. Client keepalive is on for the tunnel's own connection (asyncssh's default is
off; a frozen link is otherwise never noticed, asyncssh#321).
"""

from __future__ import annotations

from typing import Any

import asyncssh

from inverse_cloud.config import RelayConfig
from inverse_cloud.errors import HostKeyMismatch
from inverse_cloud.tunnel.channels import QuickAckConnector
from inverse_cloud.tunnel.policy import classify

__all__ = ["HOST_KEY_ALGS", "RelayClient", "dial"]

# Host key algorithms we accept a relay to show (after the pinned key's own); no SHA-1 ssh-rsa.
HOST_KEY_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "rsa-sha2-512", "rsa-sha2-256")


class RelayClient(asyncssh.SSHClient):
    """Records the host key the relay offered (for the mismatch line) and why the link went down."""

    def __init__(self) -> None:
        self.offered_fp: str | None = None
        self.lost: Exception | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Only called for a key that is NOT the pinned one: remember it and refuse.
        self.offered_fp = f"{key.get_fingerprint('sha256')} ({key.get_algorithm()})"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


async def dial(relay: RelayConfig, host_key: asyncssh.SSHKey, expected_fp: str, key: asyncssh.SSHKey, *,
               port: int, keepalive: bool, connector: QuickAckConnector | None
               ) -> tuple[asyncssh.SSHClientConnection, RelayClient]:
    """Connect and authenticate to the relay's sshd on ``port`` (``[relay] port`` or its fallback).

    :raises HostKeyMismatch: the relay showed another host key than the pinned one (names both).
    :raises OSError, asyncssh.Error, TimeoutError: the network or the relay failed (transient).
    """
    client = RelayClient()
    options: dict[str, Any] = {}
    if connector is not None:
        options["tunnel"] = connector
    # The pinned key's algorithms first, so a relay that has that key always shows it; the others only
    # so that a relay WITHOUT it still shows some key, whose fingerprint the mismatch line can name
    # (it is refused all the same: the pinned key is the only trusted one).
    pinned = [a.decode() for a in host_key.sig_algorithms]
    options["server_host_key_algs"] = pinned + [a for a in HOST_KEY_ALGS if a not in pinned]
    if keepalive:
        options["keepalive_interval"] = relay.keepalive_interval_s
        options["keepalive_count_max"] = relay.keepalive_count_max
    try:
        conn = await asyncssh.connect(
            relay.host, port, username=relay.user,
            client_factory=lambda: client,
            known_hosts=([host_key], [], []),   # the pinned key only; never None
            client_keys=[key], agent_path=None, agent_forwarding=False, config=None,
            x509_trusted_certs=None, x509_trusted_cert_paths=None,
            password_auth=False, kbdint_auth=False, host_based_auth=False, gss_auth=False, gss_kex=False,
            connect_timeout=relay.connect_timeout_s, login_timeout=relay.connect_timeout_s,
            **options)
    except (asyncssh.HostKeyNotVerifiable, asyncssh.KeyExchangeFailed) as exc:
        failure = classify(exc, relay=f"{relay.host}:{port}", expected_fp=expected_fp,
                           offered_fp=client.offered_fp, key_file=relay.key_file, user=relay.user)
        if failure.kind == "fatal":
            raise HostKeyMismatch(failure.message) from exc
        raise
    return conn, client
