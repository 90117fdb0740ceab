"""Sync tokens of the index: a collection's generation and the sequence number of its last change."""

from __future__ import annotations

__all__ = ["TOKEN_PREFIX", "make_token", "parse_token"]

TOKEN_PREFIX = "http://radicale.org/ns/sync/"  # noqa: S105 (Radicale's token namespace, not a secret)


def parse_token(token: str) -> tuple[str, int]:
    """(generation, sequence number) of one of our sync tokens.

    :raises ValueError: not a token in our form (Radicale's own wording: "Malformed token").
    """
    name = token[len(TOKEN_PREFIX):] if token.startswith(TOKEN_PREFIX) else ""
    if len(name) != 64 or any(ch not in "0123456789abcdef" for ch in name):
        raise ValueError(f"Malformed token: {token!r}")
    return name[:32], int(name[32:], 16)


def make_token(gen: str, seq: int) -> str:
    return f"{TOKEN_PREFIX}{gen}{seq:032x}"
