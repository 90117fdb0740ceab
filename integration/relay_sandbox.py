"""A relay that ``inverse-cloud relay-setup --apply root@RELAY`` configures for real, safely on this machine.

Pieces (used by the journey test):

* :func:`private_netns`: moves the calling thread (and so every process it starts afterwards) into a fresh
  network namespace with only ``lo`` up; the thread returns to its own namespace on exit. The nftables table
  and the ``route_localnet`` sysctl that setup.sh loads land there, never on the host.
* :class:`SandboxRelay`: the real OpenSSH ``sshd`` (a :class:`relay_sshd.RelaySshd`, so wait_forwards,
  restart, stop... work as in the other tunnel tests) running in a private mount namespace where ``/etc`` is
  a bind-mounted copy of this machine's ``/etc`` and ``/run`` a tmpfs (as in test_relay_setup_apply.py).
  Its ``/etc/ssh/sshd_config`` is Debian-shaped (``Include /etc/ssh/sshd_config.d/*.conf`` first) and lets
  root log in with an admin key only. Nothing from relay-setup is installed beforehand: the tunnel user, its
  keys file, the Match drop-in, the sysctl and the NAT table all come from setup.sh run over ssh.
* :meth:`SandboxRelay.apply`: runs ``inverse-cloud relay-setup --apply root@127.0.0.1:PORT`` with the real
  ``ssh`` client; only the admin's home (where ssh finds ``~/.ssh/id_ed25519`` and ``known_hosts``) is a
  test folder: root's home in a copy of /etc/passwd bind-mounted in the command's own mount namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relay_sshd import SSHD, TEST_USER, RelaySshd, configure

from tests.support import free_port, wait_until

__all__ = ["SandboxRelay", "private_netns", "sandbox_relay"]

CLONE_NEWNET = 0x40000000

# sshd in its own mount namespace: /etc is the copy, /run a tmpfs (PidFile /run/sshd.pid, read by setup.sh's
# `kill -HUP "$(cat /run/sshd.pid)"`). exec keeps the pid: Popen's pid is sshd's.
_SSHD_IN_SANDBOX = ('set -eu; mount --make-rprivate /; mount --bind "$0/etc" /etc; mount -t tmpfs tmpfs /run; '
                    f'mkdir -p /run/sshd; exec {SSHD} -D -f /etc/ssh/sshd_config -E "$0/sshd.log"')
# the admin's side: ssh takes ~ from passwd (not $HOME): only /etc/passwd is swapped, for one where root's home
# is the test's folder (/root itself holds this machine's Python)
_AS_ADMIN = 'set -eu; mount --make-rprivate /; mount --bind "$0" /etc/passwd; exec "$@"'


@contextlib.contextmanager
def private_netns() -> Iterator[None]:
    """Run the body (and every process started from this thread) in a new network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)} (needs root)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the test's network namespace: {os.strerror(err)}")
    finally:
        os.close(own)


@dataclass
class SandboxRelay(RelaySshd):
    """A real sshd on ``etc`` (a copy of /etc) in a private mount namespace; set up by ``--apply``."""

    @property
    def etc(self) -> Path:
        return self.workdir / "etc"

    @property
    def host_key_path(self) -> Path:
        return self.etc / "ssh" / "ic_test_host_ed25519_key"

    @property
    def sshd_config(self) -> Path:
        return self.etc / "ssh" / "sshd_config"

    @property
    def admin_home(self) -> Path:
        return self.workdir / "admin-home"

    def prepare(self) -> None:
        """Copy /etc, write the relay's base sshd_config, the admin key (installed for root) and a host key."""
        subprocess.run(["cp", "-a", "/etc", str(self.etc)], check=True)
        for old in (self.etc / "ssh" / "sshd_config.d").glob("inverse-cloud-*.conf"):
            old.unlink()
        # a fresh relay: the tunnel user (which other tests create on this machine) is setup.sh's to create
        for name in ("passwd", "shadow", "group", "gshadow"):
            path = self.etc / name
            if path.exists():
                path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                        if not line.startswith(f"{self.user}:")))
        self.sshd_config.write_text(
            "# test relay: Debian-shaped; relay-setup --apply adds its Match block in sshd_config.d\n"
            "Include /etc/ssh/sshd_config.d/*.conf\n"
            f"Port {self.ssh_port}\n"
            "ListenAddress 127.0.0.1\n"
            "HostKey /etc/ssh/ic_test_host_ed25519_key\n"
            "PermitRootLogin prohibit-password\n"
            "AuthorizedKeysFile /etc/ssh/ic_test_admin.keys\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "AllowTcpForwarding no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel VERBOSE\n")
        dot_ssh = self.admin_home / ".ssh"
        dot_ssh.mkdir(parents=True, mode=0o700)
        os.chmod(self.admin_home, 0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "relay admin",
                        "-f", str(dot_ssh / "id_ed25519")], check=True, capture_output=True)
        admin_keys = self.etc / "ssh" / "ic_test_admin.keys"
        admin_keys.write_text((dot_ssh / "id_ed25519.pub").read_text())
        admin_keys.chmod(0o644)
        self.new_host_key()

    def new_host_key(self, key_type: str = "ed25519") -> None:
        super().new_host_key(key_type)
        # the admin knows the relay's host key (from the VPS provider's console)
        (self.admin_home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.ssh_port} {self.host_key_line}\n")

    def start(self) -> None:
        self.log_path.touch()
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", _SSHD_IN_SANDBOX, str(self.workdir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.wait_listening()

    def wait_listening(self, timeout_s: float = 15) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=1) as s:
                    return s.recv(4).startswith(b"SSH-")
            except OSError:
                return False

        wait_until(up, timeout_s, f"sshd on 127.0.0.1:{self.ssh_port}", on_timeout=self.log)

    def apply(self, exe: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``EXE relay-setup --apply root@127.0.0.1:PORT EXTRA...`` as the relay's admin would run it."""
        passwd = self.workdir / "admin-passwd"
        passwd.write_text("".join(
            ":".join([*f[:5], str(self.admin_home), *f[6:]]) + "\n" if f[0] == "root" else ":".join(f) + "\n"
            for f in (line.split(":") for line in Path("/etc/passwd").read_text().splitlines())))
        return subprocess.run(["unshare", "-m", "sh", "-c", _AS_ADMIN, str(passwd), exe, "relay-setup",
                               "--config", str(self.config), "--apply", f"root@127.0.0.1:{self.ssh_port}", *extra],
                              capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def sandbox_relay(config: Path, *, user: str = TEST_USER, client_alive_interval: int = 2,
                  client_alive_count_max: int = 3) -> Iterator[SandboxRelay]:
    """sshd for ``config``'s [relay] port, running but NOT yet set up for the tunnel (call ``apply``).
    Must run inside :func:`private_netns`. Every sshd process it started is stopped by pid on exit."""
    from inverse_cloud.config import load

    cfg = load(config)
    https_port, http_port = free_port(), free_port()
    configure(config, "relay", https_port=https_port, http_port=http_port, user=user)
    workdir = Path(tempfile.mkdtemp(prefix="ic-relay-sandbox-"))
    relay = SandboxRelay(config=config, workdir=workdir, user=user, ssh_port=cfg.relay.port, https_port=https_port,
                         http_port=http_port, client_alive_interval=client_alive_interval,
                         client_alive_count_max=client_alive_count_max)
    try:
        relay.prepare()
        relay.start()
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
