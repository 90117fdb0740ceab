"""Checks for what a person types into ``init`` and ``setup``: each returns why an answer will not do, as
one line (``ask_until`` prints it and asks again), or None. Pure, except :func:`resolve_problem` and
:func:`ssh_problem`, which ask the network."""

from __future__ import annotations

import re
import socket

from inverse_cloud.config_checks import _domain

__all__ = ["MIN_PASSWORD_CHARS", "domain_problem", "email_problem", "password_problem", "relay_problem",
           "resolve_problem", "ssh_problem"]

# Long enough that the login delay makes guessing over the network hopeless; a phone stores it once.
MIN_PASSWORD_CHARS = 10
_COMMON = frozenset({"password", "passwort", "123456789", "1234567890", "qwertyuiop", "iloveyou",
                     "password1", "password123", "letmein123", "contacts", "calendar"})
_EMAIL = re.compile(r"[^@\s]+@([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}", re.IGNORECASE)


def domain_problem(answer: str) -> str | None:
    """A host name phones will use: not a URL, not an address, a DNS name with a dot."""
    text = answer.strip()
    if "://" in text or "/" in text:
        return f"{text!r} is a URL: give only the host name, e.g. contacts.example.org"
    if "@" in text:
        return f"{text!r} looks like an e-mail address: give the name phones will use, e.g. contacts.example.org"
    try:
        name = _domain(text)
    except ValueError:
        return f"{text!r} is not a DNS name such as contacts.example.org"
    if "." not in name:
        return f"{text!r} has no dot: give the full name, e.g. contacts.example.org"
    return None


def email_problem(answer: str) -> str | None:
    if not _EMAIL.fullmatch(answer.strip()):
        return f"{answer!r} is not an e-mail address such as you@example.org"
    return None


def password_problem(password: str, user: str = "") -> str | None:
    if len(password) < MIN_PASSWORD_CHARS:
        return f"that password is too short: use at least {MIN_PASSWORD_CHARS} characters (a few words work)"
    if len(password.encode("utf-8")) > 72:
        return "that password is longer than 72 bytes: bcrypt would ignore the rest"
    if password.lower() in _COMMON or (user and password.lower() == user.lower()) or len(set(password)) < 4:
        return "that password is too easy to guess: use a few unrelated words"
    if password != password.strip():
        return "that password starts or ends with a space, which is easy to lose when typing it on a phone"
    return None


def relay_problem(answer: str) -> str | None:
    """A relay host (``HOST`` or ``HOST:PORT``, a name or an address), syntax only."""
    text = answer.strip()
    if "://" in text or "/" in text:
        return f"{text!r} is a URL: give only the relay's name or address, e.g. relay.example.org"
    host, _, port = text.rpartition("@")[2].partition(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return f"{text!r}: the port must be 1-65535"
    try:
        socket.inet_aton(host)
        return None
    except OSError:
        pass
    try:
        _domain(host)
    except ValueError:
        return f"{host!r} is not a host name or IPv4 address"
    return None


def resolve_problem(name: str) -> str | None:
    """Why ``name`` does not resolve with this machine's resolver, in words; None when it does."""
    from inverse_cloud.ops.netprobe import describe

    try:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{name} does not resolve ({describe(exc)})"
    return None


def ssh_problem(host: str, port: int, timeout_s: float = 10.0) -> str | None:
    """Why nothing SSH-like answers at ``host:port`` (the first bytes must be ``SSH-``); None when it does."""
    from inverse_cloud.ops.netprobe import describe

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            banner = sock.recv(256)
    except OSError as exc:
        return (f"the relay {host}:{port} does not answer on SSH ({describe(exc)}); is the VPS up, and port "
                f"{port} open in the provider's firewall?")
    if not banner.startswith(b"SSH-"):
        return f"{host}:{port} answers, but not as an SSH server"
    return None
