"""The SSH link to the relay (reverse forwards), channel I/O, and the relay-side files.

asyncssh is first imported here, with pyOpenSSL hidden: asyncssh loads pyOpenSSL whenever it is installed
(acme depends on it) for X.509 SSH certificates, which the tunnel never uses (it pins the relay's host key
and logs in with its own key), and its optional-import guard then leaves X.509 support off. That keeps
pyOpenSSL's modules and its OpenSSL bindings out of serve until an ACME order needs them; importing
pyOpenSSL later works as usual.
"""

from __future__ import annotations

import sys


def _import_asyncssh_without_pyopenssl() -> None:
    if "asyncssh" in sys.modules or "OpenSSL" in sys.modules:
        return
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # makes "import OpenSSL" raise ImportError
    try:
        import asyncssh  # noqa: F401
    finally:
        del sys.modules["OpenSSL"]


_import_asyncssh_without_pyopenssl()
