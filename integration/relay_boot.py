"""What a relay's boot re-applies, read from its /etc: a reboot step for relays simulated in namespaces.

A reboot loses every runtime change: the nftables ruleset, sysctls set with ``sysctl -w``, processes. What comes
back is only what the machine's /etc holds and what is enabled in it. Here that is:

* every ``net.*`` key of ``/etc/sysctl.d/*.conf`` (systemd-sysctl.service applies them at boot, in name order;
  the other keys are the shared host kernel's, not the simulated relay's);
* the ``ExecStart=`` lines of the NAT units enabled in ``/etc/systemd/system/*.wants/``: Debian's
  ``nftables.service`` (``nft -f /etc/nftables.conf``, shipped disabled), ``netfilter-persistent.service``
  and the units relay-setup installs (``inverse-cloud-*.service``). Other enabled units (cron, getty...) are
  not run: they have nothing to do with whether the relay forwards 80/443.

:func:`boot_commands` is pure (reads files, runs nothing), so a test can show what boot would do and run it in
the relay's own namespaces.
"""

from __future__ import annotations

import shlex
from pathlib import Path

__all__ = ["NAT_UNITS", "boot_commands", "exec_starts", "sysctl_settings"]

NAT_UNITS = ("nftables.service", "netfilter-persistent.service")
UNIT_DIRS = ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")


def sysctl_settings(etc: Path) -> list[tuple[str, str]]:
    """``(key, value)`` from ``etc/sysctl.d/*.conf`` and ``etc/sysctl.conf``, in the order boot applies them."""
    out: list[tuple[str, str]] = []
    files = sorted((etc / "sysctl.d").glob("*.conf")) + [etc / "sysctl.conf"]
    for path in files:
        if not path.is_file():
            continue
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")) or "=" not in line:
                continue
            key, _, value = line.lstrip("-").partition("=")
            out.append((key.strip(), value.strip()))
    return out


def _unit_text(root: Path, name: str) -> str | None:
    for d in UNIT_DIRS:
        path = root / d / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def exec_starts(unit_text: str) -> list[list[str]]:
    """The ``ExecStart=`` command lines of a unit (``-``/``@``/``+`` prefixes dropped), as argv lists."""
    out = []
    in_service = False
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_service = line == "[Service]"
        elif in_service and line.startswith("ExecStart="):
            cmd = line.split("=", 1)[1].strip().lstrip("-@+!")
            if cmd:
                out.append(shlex.split(cmd))
    return out


def enabled_nat_units(etc: Path) -> list[str]:
    """Names of the NAT units enabled in ``etc`` (symlinks in ``systemd/system/*.wants/``)."""
    names = set()
    for link in (etc / "systemd" / "system").glob("*.wants/*.service"):
        if link.name in NAT_UNITS or link.name.startswith("inverse-cloud-"):
            names.add(link.name)
    return sorted(names, key=lambda n: (n not in NAT_UNITS, n))  # nftables.service first: it flushes the ruleset


def boot_commands(etc: Path) -> list[list[str]]:
    """The commands boot would run on the relay whose /etc is ``etc`` (paths as the relay sees them)."""
    # only net.* keys: they belong to the relay's network namespace; the rest is the shared host kernel's
    cmds = [["sysctl", "-q", "-w", f"{k}={v}"] for k, v in sysctl_settings(etc) if k.startswith("net.")]
    root = etc.parent
    for name in enabled_nat_units(etc):
        text = _unit_text(root, name) or _unit_text(Path("/"), name)
        if text is None:
            raise FileNotFoundError(f"{name} is enabled in {etc} but no unit file exists")
        cmds += exec_starts(text)
    return cmds
