"""Encryption of exports: the age format (age-encryption.org/v1) with a passphrase, through pyrage.

Why age and pyrage: age is a small, specified format with authenticated encryption (ChaCha20-Poly1305
in 64 KiB chunks, a header MAC, scrypt for the passphrase), readable by the ``age`` and ``rage`` tools
on any machine without inverse-cloud. pyrage binds rage, the Rust implementation, and ships wheels, so
no C toolchain is needed. A backup can then sit on any cloud drive: without the passphrase it reveals
nothing but its size, and any change to it (one flipped bit) makes decryption fail, so a tampered file
is refused before a single byte is written.

pyrage's passphrase API works on whole byte strings: an export is held in memory twice while it is
encrypted, and an import once while it is decrypted (contacts and calendars are megabytes, not more;
the file size is checked against the import's cap before it is read).
"""

from __future__ import annotations

__all__ = ["AGE_MAGIC", "decrypt", "encrypt", "is_encrypted"]

AGE_MAGIC = b"age-encryption.org/v1\n"


def is_encrypted(head: bytes) -> bool:
    """Does a file starting with ``head`` hold the age format (binary, not armored)?"""
    return head.startswith(AGE_MAGIC)


def encrypt(data: bytes, passphrase: str) -> bytes:
    """``data`` encrypted and authenticated for ``passphrase`` (age, scrypt recipient)."""
    import pyrage

    return bytes(pyrage.passphrase.encrypt(data, passphrase))


def decrypt(data: bytes, passphrase: str) -> bytes | None:
    """The plaintext, or None when the passphrase is wrong or the file was changed (age cannot tell
    the two apart: both fail the same authentication)."""
    import pyrage

    try:
        return bytes(pyrage.passphrase.decrypt(data, passphrase))
    except pyrage.DecryptError:
        return None
