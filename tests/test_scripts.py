"""scripts/test.sh on a machine it must not disturb, with apt-get, dpkg and the venv's tools as stand-ins.

It runs in a private mount namespace where /etc is a copy and /usr/sbin an overlay, so the policy-rc.d it
writes and the users the "tests" create land there only. The apt-get stand-in records what it was asked to
install, runs the policy-rc.d in place at that moment (as invoke-rc.d and deb-systemd-invoke do before
starting a service) and enables a unit the way a postinst does; the venv's `python -m pytest` stand-in
creates the tunnel user as integration/relay_sshd.py does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

APT = """#!/bin/sh
[ "$1" = update ] && exit 0
echo "install: $*" >> "$LOG"
if [ -x /usr/sbin/policy-rc.d ]; then /usr/sbin/policy-rc.d ssh start; echo "policy: $?" >> "$LOG"
else echo "policy: none" >> "$LOG"; fi
printf '[Unit]\\nDescription=x\\n[Service]\\nExecStart=/bin/true\\n[Install]\\nWantedBy=multi-user.target\\n' \\
  > /etc/systemd/system/wofake.service
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/wofake.service /etc/systemd/system/multi-user.target.wants/wofake.service
"""
PYTHON = """#!/bin/sh
[ "$1 $2" = "-m pytest" ] && useradd --system --no-create-home --shell /bin/sh ictunnel
exit 0
"""
SANDBOX = """set -eu
T=$0
mount --make-rprivate /
mount --bind "$T/etc" /etc
mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir="$T/sbin-up",workdir="$T/sbin-work" /usr/sbin
rm -f /usr/sbin/policy-rc.d
userdel ictunnel 2>/dev/null || true; groupdel ictunnel 2>/dev/null || true
set +e
PATH="$T/bin:$PATH" VENV="$T/venv" LOG="$T/log" bash "$1/scripts/test.sh" -q > "$T/out" 2>&1
echo "rc: $?" >> "$T/log"
set -e
[ -e /usr/sbin/policy-rc.d ] && echo "after: policy-rc.d left" >> "$T/log"
id -u ictunnel >/dev/null 2>&1 && echo "after: ictunnel left" >> "$T/log"
[ -e /etc/systemd/system/multi-user.target.wants/wofake.service ] && echo "after: wofake enabled" >> "$T/log"
exit 0
"""


def test_test_sh_installs_venv_starts_no_service_and_leaves_no_user(tmp_path):
    """test.sh asks apt for python3-venv (a fresh Debian has no `python3 -m venv`), a policy-rc.d that forbids
    starting services is in place while apt installs and gone afterwards, the unit a package enabled is
    disabled again, and the tunnel user the tests created is removed at the end."""
    assert os.geteuid() == 0, "needs root (a private mount namespace); CI runs as root"
    subprocess.run(["cp", "-a", "/etc", str(tmp_path / "etc")], check=True)
    for d in ("sbin-up", "sbin-work", "bin", "venv/bin"):
        (tmp_path / d).mkdir(parents=True)
    for path, text in ((tmp_path / "bin" / "apt-get", APT), (tmp_path / "bin" / "dpkg", "#!/bin/sh\nexit 1\n"),
                       (tmp_path / "venv" / "bin" / "python", PYTHON),
                       *((tmp_path / "venv" / "bin" / t, "#!/bin/sh\nexit 0\n") for t in ("pip", "ruff", "mypy"))):
        path.write_text(text)
        path.chmod(0o755)
    out = subprocess.run(["unshare", "-m", "sh", "-c", SANDBOX, str(tmp_path), str(REPO)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "log").read_text()
    detail = log + (tmp_path / "out").read_text()
    install = next(line for line in log.splitlines() if line.startswith("install: "))
    assert "python3-venv" in install.split(), detail
    assert "policy: 101" in log, detail
    assert "rc: 0" in log, detail
    assert "after:" not in log, detail
