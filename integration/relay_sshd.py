"""A real OpenSSH ``sshd`` playing the relay, configured with what ``inverse-cloud relay-setup`` generates.

Reusable by any integration test that needs the tunnel (e.g. ACME validation through the relay)::

    from tests.support import init_instance, free_port
    from integration.relay_sshd import relay_sshd, TEST_USER

    ssh_port = free_port()
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{ssh_port}")
    with relay_sshd(cfg) as relay:               # sshd up, host key pinned in cfg, free forward ports set
        with ServeProcess(cfg) as srv:
            relay.wait_forwards()                 # both reverse forwards bound on the relay
            ... https://laptop.test:{relay.https_port}/ through curl --resolve laptop.test:PORT:127.0.0.1

What it does: creates the system user ``ictunnel`` (shell /bin/sh, password '*', idempotent; needs root),
picks free ports for the relay's forwarded HTTPS/HTTP listeners and writes them into ``[relay]`` of the
config, runs ``inverse-cloud relay-setup --output DIR --no-pin`` (authorized_keys + the sshd Match drop-in),
generates a host key, starts ``sshd -D -f CFG -E LOG`` on the config's relay port with the drop-in
``Include``d at the top (as Debian's sshd_config does), and pins the host key with a second
``relay-setup --yes`` run. Every process it started (the listener and every session child it has seen)
is stopped by pid on exit.

Test-only differences from a production relay: ``StrictModes no`` (the files live under /tmp, whose
world-writable parent StrictModes rejects), ``UsePAM no``, LogLevel VERBOSE, and short ClientAlive
settings by default (2 s x 3).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from inverse_cloud.tunnel.commands import set_config_value
from tests.support import free_port, wait_until

__all__ = ["TEST_USER", "RelaySshd", "configure", "ensure_system_user", "relay_sshd", "sshd_available"]

TEST_USER = "ictunnel"
SSHD = "/usr/sbin/sshd"


def sshd_available() -> str | None:
    """None if this machine can run the relay; else what is missing (tests fail with it, never skip)."""
    if not os.path.exists(SSHD):
        return f"{SSHD} missing: apt-get install openssh-server"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen missing: apt-get install openssh-client"
    if os.geteuid() != 0:
        return "the relay tests run sshd as root with a system user (CI runs as root)"
    return None


def ensure_system_user(user: str = TEST_USER) -> None:
    """Create the tunnel user as relay-setup's setup.sh does (idempotent), with the comment setup.sh marks its
    own accounts with, so that a relay sandbox copying this /etc may re-run setup.sh on it."""
    missing = sshd_available()
    if missing:
        raise RuntimeError(missing)
    if subprocess.run(["id", "-u", user], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                        "/bin/sh", "--comment", "inverse-cloud tunnel (test)", user], check=False,
                       capture_output=True)
    subprocess.run(["usermod", "--shell", "/bin/sh", "-p", "*", "--comment", "inverse-cloud tunnel (test)", user],
                   check=True, capture_output=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def configure(config: Path, section: str, **values: object) -> None:
    """Set keys in the inverse-cloud config file (a text edit, like relay-setup's host_key pin)."""
    text = config.read_text()
    for key, value in values.items():
        literal = ("true" if value else "false") if isinstance(value, bool) else (
            f'"{value}"' if isinstance(value, str) else str(value))
        text = set_config_value(text, section, key, literal)
    config.write_text(text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inverse_cloud.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    return f"{host}:{port}" in out


def port_holders(port: int) -> list[int]:
    """Pids of the processes listening on ``port`` (the relay session child holding a forward)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


@dataclass
class RelaySshd:
    config: Path                      # the inverse-cloud config this relay serves
    workdir: Path
    user: str
    ssh_port: int
    https_port: int                   # relay-side listener of the HTTPS forward ("public 443" stand-in)
    http_port: int                    # relay-side listener of the HTTP forward ("public 80" stand-in)
    client_alive_interval: int
    client_alive_count_max: int
    proc: subprocess.Popen[bytes] | None = None
    seen: set[int] = field(default_factory=set)
    listen_address: str = "127.0.0.1"  # sshd's ListenAddress (the laptop's side of a veth in the F5 test)
    setup_args: tuple[str, ...] = ()   # more relay-setup options for render() and pin()

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle"

    @property
    def host_key_path(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def host_key_line(self) -> str:
        return " ".join(Path(f"{self.host_key_path}.pub").read_text().split()[:2])

    @property
    def sshd_config(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- setup --

    def render(self) -> None:
        out = _cli("relay-setup", "--config", str(self.config), "--output", str(self.bundle), "--no-pin",
                   "--client-alive-interval", str(self.client_alive_interval),
                   "--client-alive-count-max", str(self.client_alive_count_max),
                   "--authorized-keys-file", str(self.bundle / "authorized_keys"), *self.setup_args)
        if out.returncode != 0:
            raise RuntimeError(f"relay-setup --output failed ({out.returncode}): {out.stderr}")

    def new_host_key(self, key_type: str = "ed25519") -> None:
        for p in (self.host_key_path, Path(f"{self.host_key_path}.pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "test-relay", "-f",
                        str(self.host_key_path)], check=True, capture_output=True)

    def write_sshd_config(self) -> None:
        self.sshd_config.write_text(
            f"# test relay: base config; the Match block comes from relay-setup, included first as on Debian\n"
            f"Include {self.bundle}/sshd_config.d/inverse-cloud.conf\n"
            f"Port {self.ssh_port}\n"
            f"ListenAddress {self.listen_address}\n"
            f"HostKey {self.host_key_path}\n"
            f"PidFile {self.workdir}/sshd.pid\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin no\n"
            "AllowTcpForwarding no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel VERBOSE\n")

    def check_config(self) -> None:
        out = subprocess.run([SSHD, "-t", "-f", str(self.sshd_config)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"sshd -t failed: {out.stderr}")

    def start(self) -> None:
        self.check_config()
        with open(self.log_path, "ab") as _:
            pass
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.log_path)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection((self.listen_address, self.ssh_port), timeout=1) as s:
                    return s.recv(4).startswith(b"SSH-")
            except OSError:
                return False

        wait_until(up, 15, f"sshd on {self.listen_address}:{self.ssh_port}", on_timeout=self.log)

    def pin(self) -> None:
        out = _cli("relay-setup", "--config", str(self.config), "--output", str(self.bundle), "--yes",
                   "--accept-new-host-key",
                   "--client-alive-interval", str(self.client_alive_interval),
                   "--client-alive-count-max", str(self.client_alive_count_max),
                   "--authorized-keys-file", str(self.bundle / "authorized_keys"), *self.setup_args)
        if out.returncode != 0:
            raise RuntimeError(f"relay-setup pin failed ({out.returncode}): {out.stderr}")

    # -- observation --

    def track(self) -> list[int]:
        """Session processes under the listener (remembered, so they are stopped even if orphaned)."""
        if self.proc is None:
            return []
        found: list[int] = []
        todo = _children(self.proc.pid)
        while todo and len(found) < 1000:
            p = todo.pop()
            found.append(p)
            todo.extend(_children(p))
        self.seen.update(found)
        return found

    def session_pids(self) -> list[int]:
        """Live sshd processes of the tunnel user's sessions (the unprivileged per-session children)."""
        self.track()
        out = []
        for p in sorted(self.seen):
            if _alive(p) and _comm(p).startswith("sshd"):
                try:
                    if os.stat(f"/proc/{p}").st_uid != 0:
                        out.append(p)
                except FileNotFoundError:
                    pass
        return out

    def forwards_bound(self) -> bool:
        return port_listening(self.https_port) and port_listening(self.http_port)

    def wait_forwards(self, timeout_s: float = 30, on_timeout: object = None) -> None:
        wait_until(self.forwards_bound, timeout_s, f"both forwards bound on the relay ({self.https_port}, "
                   f"{self.http_port})", interval_s=0.05,
                   on_timeout=(on_timeout if callable(on_timeout) else self.log))  # type: ignore[arg-type]
        self.track()

    def holders(self) -> list[int]:
        return port_holders(self.https_port)

    # -- faults --

    def kill_session(self, sig: int = signal.SIGTERM) -> list[int]:
        """Kill the session child that holds the forwards (F3b): the relay side of the tunnel dies."""
        self.track()
        pids = self.holders()
        for p in pids:
            os.kill(p, sig)
        return pids

    def kill_listener(self) -> None:
        """Stop only the sshd listener (F3a): sessions keep running."""
        self.track()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, new_host_key: bool = False) -> None:
        """Stop the listener and every session, optionally make a new host key (F3c), start again."""
        self._stop_processes()
        if new_host_key:
            self.new_host_key()
        self.start()

    def _stop_processes(self) -> None:
        self.track()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        for p in sorted(self.seen):
            if _alive(p) and _comm(p).startswith("sshd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) and _comm(p).startswith("sshd") for p in self.seen):
            time.sleep(0.02)   # polling interval of a bounded wait for processes to exit
        for p in sorted(self.seen):
            if _alive(p) and _comm(p).startswith("sshd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        self.seen.clear()

    def stop(self) -> None:
        self._stop_processes()


@contextlib.contextmanager
def relay_sshd(config: Path, *, user: str = TEST_USER, client_alive_interval: int = 2,
               client_alive_count_max: int = 3, pin: bool = True,
               listen_address: str = "127.0.0.1", setup_args: tuple[str, ...] = ()) -> Iterator[RelaySshd]:
    """The relay for ``config`` (its [relay] port is sshd's port): see the module docstring. ``listen_address``
    is where sshd listens (the forwarded ports stay on the relay's loopback, as relay-setup permits them).
    ``setup_args`` go to both relay-setup runs (e.g. ``--ipv6``: the Match block also permits the [::] pair)."""
    from inverse_cloud.config import load

    ensure_system_user(user)
    cfg = load(config)
    https_port, http_port = free_port(), free_port()
    configure(config, "relay", https_port=https_port, http_port=http_port, user=user)
    workdir = Path(tempfile.mkdtemp(prefix="ic-relay-"))
    os.chmod(workdir, 0o755)  # noqa: S103 (sshd reads authorized_keys as the tunnel user; no secrets)
    relay = RelaySshd(config=config, workdir=workdir, user=user, ssh_port=cfg.relay.port, https_port=https_port,
                      http_port=http_port, client_alive_interval=client_alive_interval,
                      client_alive_count_max=client_alive_count_max, listen_address=listen_address,
                      setup_args=setup_args)
    try:
        relay.render()
        relay.new_host_key()
        relay.write_sshd_config()
        relay.start()
        if pin:
            relay.pin()
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
