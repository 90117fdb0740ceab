"""`inverse-cloud relay-setup --apply ADMIN@RELAY` runs the generated setup.sh on the relay through OpenSSH.

The "relay" here is this machine inside a sandbox: a private mount and network namespace (``unshare -m -n``)
in which /etc is a bind-mounted copy and /run a tmpfs, so useradd, the sshd drop-in, ``sshd -t`` (the real
one, on Debian's real sshd_config with its Include line), the sysctl and the nftables rules all really run
but change nothing outside. ``ssh`` is a stand-in on PATH that enters the sandbox and runs the remote
command (``sh -s``) with the script on stdin, as the real ssh would on the relay.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from tests.support import default_signals, init_instance

SANDBOX = r"""#!/bin/sh
# usage: sandbox.sh ROOT CMD...   (stdin passed through)
set -eu
ROOT=$1; shift
exec unshare -m -n sh -c '
  set -eu
  ROOT=$0
  mount --make-rprivate /
  mount --bind "$ROOT/etc" /etc
  mount -t tmpfs tmpfs /run
  mkdir -p /run/sshd
  ip link set lo up
  # the relay sshd whose reload we watch: a stand-in that records SIGHUP
  sh -c "trap \"echo hup >> $ROOT/hup; exit 0\" HUP; touch /run/ready; while :; do sleep 0.05; done" \
    </dev/null >/dev/null 2>&1 &
  fake=$!
  echo $fake > /run/sshd.pid
  n=0; while [ ! -e /run/ready ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
  trap "kill $fake 2>/dev/null || true" EXIT
  set +e
  "$@"; rc=$?
  set -e
  # a reloaded "sshd" records the SIGHUP and exits: give it up to 2 s (bounded poll), then stop it
  n=0; while kill -0 $fake 2>/dev/null && [ $n -lt 40 ]; do sleep 0.05; n=$((n+1)); done
  nft list table ip inverse_cloud > "$ROOT/nft.out" 2>&1 || true
  sysctl -n net.ipv4.conf.all.route_localnet > "$ROOT/localnet.out" 2>&1 || true
  exit $rc
' "$ROOT" "$@"
"""


def _sandbox(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "relay"
    root.mkdir()
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
    box = tmp_path / "sandbox.sh"
    box.write_text(SANDBOX)
    box.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_ssh = bindir / "ssh"
    # ssh [-p P] [-o X] ... USER@HOST REMOTE-COMMAND: run the remote command inside the sandbox
    fake_ssh.write_text(f'#!/bin/sh\necho "$@" > {root}/ssh-args\nfor last; do :; done\n'
                        f'exec {box} {root} sh -c "$last"\n')
    fake_ssh.chmod(0o755)
    return root, bindir


def _apply(cfg: Path, bindir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--apply",
                           "root@relay.example:2222", "--no-pin", *extra], capture_output=True, text=True,
                          timeout=120, env=env, preexec_fn=default_signals)   # the stand-in sshd traps SIGHUP


def test_apply_sets_up_the_relay_idempotently(tmp_path):
    """--apply twice: the user exists once with /bin/sh and password '*', the keys file and the drop-in
    hold exactly what relay-setup renders, `sshd -t` passed and sshd got one SIGHUP per run, the
    nftables NAT table is loaded and route_localnet is on (in the sandbox's own network namespace)."""
    assert os.geteuid() == 0, "needs root (unshare -m -n); CI runs as root"
    root, bindir = _sandbox(tmp_path)
    cfg = init_instance(tmp_path / "ic", relay="icapply@relay.example:2222")
    for run in (1, 2):
        out = _apply(cfg, bindir)
        assert out.returncode == 0, out.stderr + out.stdout
        assert "inverse-cloud: relay ready for user icapply" in out.stdout
        assert (root / "hup").read_text().count("hup") == run
    assert (root / "ssh-args").read_text().strip() == "-p 2222 -o ConnectTimeout=15 root@relay.example sh -s"
    users = [line for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("icapply:")]
    assert len(users) == 1 and users[0].endswith(":/bin/sh")
    shadow = [line for line in (root / "etc" / "shadow").read_text().splitlines() if line.startswith("icapply:")]
    assert shadow[0].split(":")[1] == "*"
    bundle = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "inverse_cloud.cli", "relay-setup", "--config", str(cfg), "--output",
                    str(bundle), "--no-pin"], check=True, capture_output=True)
    keys = root / "etc" / "ssh" / "inverse-cloud" / "icapply.keys"
    assert keys.read_text() == (bundle / "authorized_keys").read_text()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o644 and keys.stat().st_uid == 0
    dropin = root / "etc" / "ssh" / "sshd_config.d" / "inverse-cloud-icapply.conf"
    assert dropin.read_text() == (bundle / "sshd_config.d" / "inverse-cloud.conf").read_text()
    nft = (root / "nft.out").read_text()
    assert "dnat to 127.0.0.1:44353" in nft and "dnat to 127.0.0.1:8053" in nft, nft
    assert (root / "localnet.out").read_text().strip() == "1"
    # the host's real files are untouched
    assert not Path("/etc/ssh/inverse-cloud/icapply.keys").exists()
    assert "icapply:" not in Path("/etc/passwd").read_text()


def test_apply_refuses_to_reload_a_broken_sshd_config(tmp_path):
    """A relay whose sshd config does not pass `sshd -t` (a bogus line elsewhere): setup.sh removes its
    drop-in again, does not reload sshd, and relay-setup fails with the script's last line."""
    assert os.geteuid() == 0, "needs root (unshare -m -n); CI runs as root"
    root, bindir = _sandbox(tmp_path)
    (root / "etc" / "ssh" / "sshd_config.d" / "broken.conf").write_text("ThisIsNotAnOption yes\n")
    cfg = init_instance(tmp_path / "ic", relay="icapply@relay.example:2222")
    out = _apply(cfg, bindir)
    assert out.returncode == 1
    assert "sshd -t failed" in out.stderr and "sshd not reloaded" in out.stderr
    assert not (root / "hup").exists()
    assert not (root / "etc" / "ssh" / "sshd_config.d" / "inverse-cloud-icapply.conf").exists()


BOOT = r"""
set -eu
ROOT=$0
mount --make-rprivate /
mount --bind "$ROOT/etc" /etc
ip link set lo up
"""


def test_apply_makes_the_nat_survive_a_reboot(tmp_path):
    """After --apply, a reboot of the relay: a fresh network namespace (no ruleset, route_localnet 0) in which
    only what the relay's /etc holds and has enabled is re-applied (relay_boot: sysctl.d, the enabled NAT
    units' ExecStart). The inverse_cloud NAT table and route_localnet come back."""
    from relay_boot import boot_commands, enabled_nat_units

    assert os.geteuid() == 0, "needs root (unshare -m -n); CI runs as root"
    root, bindir = _sandbox(tmp_path)
    cfg = init_instance(tmp_path / "ic", relay="icapply@relay.example:2222")
    out = _apply(cfg, bindir)
    assert out.returncode == 0, out.stderr + out.stdout
    assert enabled_nat_units(root / "etc"), "setup.sh enabled no unit that loads the NAT rules at boot"
    script = BOOT + "".join(" ".join(shlex.quote(a) for a in cmd) + "\n" for cmd in boot_commands(root / "etc"))
    script += "nft list table ip inverse_cloud\nsysctl -n net.ipv4.conf.all.route_localnet\n"
    booted = subprocess.run(["unshare", "-m", "-n", "sh", "-c", script, str(root)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert booted.returncode == 0, booted.stderr
    assert "dnat to 127.0.0.1:44353" in booted.stdout and "dnat to 127.0.0.1:8053" in booted.stdout, booted.stdout
    assert booted.stdout.strip().splitlines()[-1] == "1", booted.stdout


def test_apply_iptables_variant_survives_a_reboot_too(tmp_path):
    """The same reboot with --nat iptables: the INVERSE_CLOUD chains and their jumps come back."""
    from relay_boot import boot_commands

    assert os.geteuid() == 0, "needs root (unshare -m -n); CI runs as root"
    root, bindir = _sandbox(tmp_path)
    cfg = init_instance(tmp_path / "ic", relay="icapply@relay.example:2222")
    out = _apply(cfg, bindir, "--nat", "iptables")
    assert out.returncode == 0, out.stderr + out.stdout
    script = BOOT + "".join(" ".join(shlex.quote(a) for a in cmd) + "\n" for cmd in boot_commands(root / "etc"))
    script += "iptables -t nat -S\n"
    booted = subprocess.run(["unshare", "-m", "-n", "sh", "-c", script, str(root)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert booted.returncode == 0, booted.stderr
    assert "-A PREROUTING -j INVERSE_CLOUD_PRE" in booted.stdout, booted.stdout
    assert "--to-destination 127.0.0.1:44353" in booted.stdout, booted.stdout


def test_apply_refuses_an_account_it_did_not_create(tmp_path):
    """The relay already has an account `icapply` (a person's login, made by adduser): setup.sh stops with
    one line saying why, before touching the account, its keys or sshd."""
    assert os.geteuid() == 0, "needs root (unshare -m -n); CI runs as root"
    root, bindir = _sandbox(tmp_path)
    for name, line in (("passwd", "icapply:x:4242:4242:Ic Apply,,,:/home/icapply:/bin/bash\n"),
                       ("shadow", "icapply:$y$j9T$secret:20000:0:99999:7:::\n"), ("group", "icapply:x:4242:\n")):
        with open(root / "etc" / name, "a") as fh:
            fh.write(line)
    cfg = init_instance(tmp_path / "ic", relay="icapply@relay.example:2222")
    out = _apply(cfg, bindir)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "icapply" in last and "not created by inverse-cloud" in last, out.stderr
    assert "icapply:$y$j9T$secret:" in (root / "etc" / "shadow").read_text()
    assert "/bin/bash" in next(ln for ln in (root / "etc" / "passwd").read_text().splitlines()
                               if ln.startswith("icapply:"))
    assert not (root / "etc" / "ssh" / "inverse-cloud" / "icapply.keys").exists()
    assert not (root / "hup").exists()
