"""What the certificate manager keeps in ``[server] state_dir``, shared with ``inverse-cloud cert``: the
renewal state (the failure streak and its backoff, which survive a restart), the lock a running manager
holds (its pid, so ``cert renew`` can signal it) and the renew-request file."""

from __future__ import annotations

import fcntl
import logging
import os

from inverse_cloud.certs.policy import RenewalState
from inverse_cloud.config import Config
from inverse_cloud.fsutil import atomic_write, ensure_private_dir

__all__ = ["StateFiles"]

log = logging.getLogger("inverse_cloud.certs.manager")


class StateFiles:
    """Paths under ``[server] state_dir`` shared by the component and ``inverse-cloud cert``."""

    def __init__(self, cfg: Config) -> None:
        root = cfg.server.state_dir
        self.root = root
        self.state = root / "acme-state.json"
        self.lock = root / "acme.lock"
        self.request = root / "acme-renew-request.json"

    def load_state(self) -> RenewalState:
        try:
            return RenewalState.from_json(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return RenewalState()
        except (OSError, ValueError) as exc:
            log.warning("renewal state %s unreadable (%s); starting with a clean failure history", self.state, exc)
            return RenewalState()

    def save_state(self, state: RenewalState) -> None:
        ensure_private_dir(self.root)
        atomic_write(self.state, state.to_json().encode(), mode=0o600)

    def try_lock(self, role: str = "serve") -> int | None:
        """Take the manager lock (fd) or None if another process holds it. The file says who holds it."""
        ensure_private_dir(self.root)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {role}\n".encode())
        return fd

    def holder(self) -> tuple[int, str] | None:
        """(pid, role) of the process holding the lock ("serve" or "cli"), or None when nobody does."""
        if not self.lock.exists():
            return None
        fd = os.open(self.lock, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                return None
        finally:
            os.close(fd)
        try:
            pid, _, role = self.lock.read_text().strip().partition(" ")
            return int(pid), role or "serve"
        except (OSError, ValueError):
            return (0, "serve")
