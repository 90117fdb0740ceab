"""`service install` under a real systemd: a container booted by systemd-nspawn from this machine's own tree
(an overlay of / with a tmpfs on top, in a private mount namespace, so nothing it writes reaches the host; a
network namespace of its own, so the units it boots bind nothing here). Its PID 1 is systemd, its logind gives
root a user manager once linger is on, and `inverse-cloud service install` then runs in a login shell
(`su -l`), as a user runs it.

This machine's PID 1 is not systemd and its cgroups are a v1/v2 mix, so a `systemd --user` started here exits at
once; inside the container systemd owns its cgroup tree and the user manager runs.

The checkout under test reaches the unit through the user manager's environment (PYTHONPATH), the one thing
arranged by the test; everything else is the installed console script and the docs' commands."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.docs import DocBlocks

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse"
HTTPS = "127.0.0.1:8443"


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


class Container:
    """A booted container; :meth:`login` runs a script in a login shell of root inside it."""

    def __init__(self, init_pid: int) -> None:
        self.init_pid = init_pid

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def login(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("su", "-l", "root", "-c", script, timeout=timeout)


@contextlib.contextmanager
def booted(tmp: Path, binds: tuple[Path, ...] = ()) -> Iterator[Container]:
    """Boot the container; stop it by pid at the end (SIGTERM: nspawn halts the container's systemd). ``binds``
    are folders of this machine shown at the same path inside: the overlay has them too, but a checkout (or
    its venv) under /tmp would be hidden by the tmpfs that the container gets on /tmp."""
    tree, upper = tmp / "tree", tmp / "upper"
    tree.mkdir()
    upper.mkdir()
    boot = (f"set -e; mount -t tmpfs tmpfs {upper}; mkdir {upper}/up {upper}/work; "
            f"mount -t overlay overlay -o lowerdir=/,upperdir={upper}/up,workdir={upper}/work {tree}; "
            f"exec systemd-nspawn -D {tree} --register=no --keep-unit --private-network -M wow{os.getpid()} "
            + "".join(f"--bind={shlex.quote(str(b))} " for b in binds) + "-b --console=pipe")
    log = tmp / "nspawn.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", boot],
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    try:
        def init() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited ({proc.returncode}): {log.read_text(errors='replace')}")
            if _comm(proc.pid) != "systemd-nspawn":  # still the shell mounting the overlay
                return None
            kids = [k for k in _children(proc.pid) if _comm(k) == "systemd"]
            return kids[0] if kids else None

        box = Container(wait_until(init, 60, "the container's init"))

        def logins_work() -> bool:
            # not the whole boot: units of this machine that wait for a network (wait-online) take minutes
            return box.run("systemctl", "is-active", "dbus.service", "systemd-logind.service").returncode == 0

        wait_until(logins_work, 180, "the container's dbus and logind", interval_s=0.5,
                   on_timeout=lambda: box.run("systemctl", "list-jobs", "--no-pager").stdout
                   + log.read_text(errors="replace")[-3000:])
        yield box
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)


@pytest.mark.slow
def test_service_install_under_systemd(tmp_path):
    """In the container, as root in a login shell: setup.md's `loginctl enable-linger $USER` -> root's user
    manager runs -> `init` (local only) -> `service install` says "enabled and started" and exits 0 ->
    `systemctl --user is-active` says active (Type=notify: only after the server said it is ready) -> a DAV
    client gets 207 from the unit's listener -> `inverse-cloud status` names the unit's main pid -> the server
    killed with SIGKILL: systemd starts it again and it serves -> `service uninstall`: inactive, the unit gone."""
    assert os.geteuid() == 0, "systemd-nspawn needs root; CI runs as root"
    assert shutil.which("systemd-nspawn"), "systemd-nspawn missing (Debian package systemd-container)"
    docs = DocBlocks(REPO, "test_service_install_under_systemd")
    bindir = Path(sys.executable).parent
    assert (bindir / "inverse-cloud").exists(), bindir
    env = (f"export PATH={shlex.quote(str(bindir))}:$PATH PYTHONPATH={shlex.quote(str(REPO))}; "
           f"systemctl --user set-environment PYTHONPATH={shlex.quote(str(REPO))}; ")
    venv = Path(sys.executable).parent.parent
    with booted(tmp_path, tuple(dict.fromkeys((REPO, venv)))) as box:
        linger = docs.take("docs/setup.md", "loginctl enable-linger", role="container")
        out = box.login(linger.lines[0])
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: box.run("systemctl", "is-active", "user@0.service").stdout.strip() == "active", 60,
                   "root's user manager", on_timeout=lambda: box.run("systemctl", "status", "--no-pager",
                                                                    "user@0.service").stdout)
        out = box.login(env + f"printf '%s\\n' {shlex.quote(PASSWORD)} > ~/pw.txt && inverse-cloud init "
                        "--non-interactive --domain contacts.example.org --relay '' --acme-email '' --user alice "
                        f"--password-file ~/pw.txt --https-listen {HTTPS} --http-listen 127.0.0.1:8080")
        assert out.returncode == 0, out.stdout + out.stderr
        out = box.login(env + "inverse-cloud service install")
        assert out.returncode == 0 and "enabled and started inverse-cloud.service" in out.stdout, \
            out.stdout + out.stderr

        def main_pid() -> int:
            out = box.login("systemctl --user show -p MainPID --value inverse-cloud")
            return int(out.stdout.strip() or 0)

        def serving() -> bool:
            active = box.login("systemctl --user is-active inverse-cloud").stdout.strip() == "active"
            code = box.login(f"curl -sk -o /dev/null -w '%{{http_code}}' -u alice:{shlex.quote(PASSWORD)} "
                             f"-X PROPFIND -H 'Depth: 1' https://{HTTPS}/radicale/alice/").stdout.strip()
            return active and code == "207"

        def journal() -> str:
            return box.login("journalctl --user -u inverse-cloud --no-pager -n 40").stdout

        assert box.login("systemctl --user is-active inverse-cloud").stdout.strip() == "active", journal()
        wait_until(serving, 60, "the unit serving DAV", interval_s=0.5, on_timeout=journal)
        first = main_pid()
        status = box.login(env + "inverse-cloud status")
        assert status.returncode == 0 and f"(pid {first}," in status.stdout, status.stdout + status.stderr

        box.run("kill", "-KILL", str(first))
        wait_until(lambda: main_pid() not in (0, first) and serving(), 90, "systemd to restart the server",
                   interval_s=0.5, on_timeout=journal)

        out = box.login(env + "inverse-cloud service uninstall")
        assert out.returncode == 0, out.stdout + out.stderr
        state = box.login("systemctl --user is-active inverse-cloud").stdout.strip()
        assert state in ("inactive", "unknown"), state
        assert box.login("test -e ~/.config/systemd/user/inverse-cloud.service").returncode == 1
    docs.assert_all_ran()
