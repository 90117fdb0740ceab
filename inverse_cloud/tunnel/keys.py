"""The laptop's SSH keys for the relay: the tunnel key and the takeover key (ed25519, 0600 in 0700)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["generate_ssh_key"]


def generate_ssh_key(path: Path, comment: str) -> bool:
    """Create an ed25519 key (0600 in a 0700 directory) unless one exists. True if created."""
    import asyncssh

    from inverse_cloud.fsutil import atomic_write, ensure_private_dir

    if path.exists():
        return False
    ensure_private_dir(path.parent)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    atomic_write(path, key.export_private_key("openssh"), mode=0o600)
    atomic_write(path.with_suffix(".pub"), key.export_public_key("openssh"), mode=0o644)
    return True
