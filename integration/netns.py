"""A laptop in its own network namespace whose address really changes (docs/test-matrix.md F5).

On loopback every 127.0.0.0/8 address is local, so deleting one does not kill a path. Here the laptop gets a
real one: a named network namespace joined by a veth pair to the namespace of the calling thread (the relay
side: sshd, the phone, ``ss``), with its own address on its veth end. Deleting that address leaves the open TCP
connection with a source address the laptop no longer has: its packets cannot be routed any more and the
relay's answers are dropped, while the relay keeps the session. A new address then gives a working path for
new connections::

    with private_netns(), laptop_netns("10.99.7.1", "10.99.7.3") as laptop:  # relay side off the host
        with ServeProcess(cfg, prefix=laptop.exec_prefix, ready_probe=laptop.tls_handshake_ok) as srv:
            ...
            laptop.change_address("10.99.7.3", "10.99.7.4")

The relay side must not be the host's own namespace (the veth's other end and its address would land on the
host): :func:`laptop_netns` refuses to run where any interface but ``lo`` exists; use
:func:`relay_sandbox.private_netns` around it. The named
namespace (and with it the veth pair) is deleted on exit, also on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from relay_sandbox import CLONE_NEWNET

from tests.support import tls_handshake_ok

__all__ = ["LaptopNetns", "laptop_netns"]

T = TypeVar("T")
PREFIX_LEN = 24


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@dataclass
class LaptopNetns:
    """The laptop's named network namespace: ``laptop_if`` in it, ``relay_if`` on the caller's side."""

    name: str
    relay_address: str
    address: str                       # the laptop's current address on laptop_if
    relay_if: str = "icrelay0"
    laptop_if: str = "iclaptop0"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def exec_prefix(self) -> list[str]:
        """Runs a command in the namespace; ``ip netns exec`` execs it, so the pid stays the command's."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("link", "add", self.relay_if, "type", "veth", "peer", "name", self.laptop_if, "netns", self.name)
        _ip("addr", "add", f"{self.relay_address}/{PREFIX_LEN}", "dev", self.relay_if)
        _ip("link", "set", self.relay_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", self.laptop_if)
        _ip("-n", self.name, "link", "set", self.laptop_if, "up")

    def delete(self) -> None:
        """Delete the namespace; its veth end goes with it, and so does the peer on the relay side."""
        _ip("netns", "delete", self.name)

    def change_address(self, old: str, new: str) -> None:
        """The network change: the laptop loses ``old`` (connections from it are now dead paths), gets ``new``."""
        _ip("-n", self.name, "addr", "del", f"{old}/{PREFIX_LEN}", "dev", self.laptop_if)
        _ip("-n", self.name, "addr", "add", f"{new}/{PREFIX_LEN}", "dev", self.laptop_if)
        self.address = new

    def ip(self, *args: str) -> None:
        """``ip ARGS`` inside the laptop's namespace (e.g. ``link set iclaptop0 down``)."""
        _ip("-n", self.name, *args)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` with this thread inside the laptop's namespace (sockets it opens live there); the
        thread returns to its own namespace afterwards, also when ``fn`` raises."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                _setns(target, self.path)
                try:
                    return fn(*args)
                finally:
                    _setns(own, "back to the caller's namespace")
            finally:
                os.close(target)
        finally:
            os.close(own)

    def tls_handshake_ok(self, port: int) -> bool:
        """A TLS handshake to 127.0.0.1:``port`` inside the laptop (a ServeProcess ``ready_probe``)."""
        return self.call(tls_handshake_ok, "127.0.0.1", port)


def _links_here() -> list[str]:
    """Interface names in the calling thread's network namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line]


@contextlib.contextmanager
def laptop_netns(relay_address: str, laptop_address: str, name_prefix: str = "ic-laptop") -> Iterator[LaptopNetns]:
    """A fresh laptop namespace (``name_prefix``-pid-random) wired to the calling thread's namespace; deleted on
    exit."""
    others = [name for name in _links_here() if name != "lo"]
    if others:  # the host's namespace, or another test's: the veth end and its route would land there
        raise RuntimeError(f"laptop_netns needs a fresh namespace on the calling side (found {others}): run it "
                           "inside relay_sandbox.private_netns()")
    ns = LaptopNetns(name=f"{name_prefix}-{os.getpid()}-{secrets.token_hex(3)}", relay_address=relay_address,
                     address=laptop_address)
    try:
        ns.create()
        yield ns
    finally:
        if os.path.exists(ns.path):
            ns.delete()
