"""What a relay's boot re-applies, read from its /etc: a reboot step for relays simulated in namespaces.

A reboot loses every runtime change: the nftables ruleset, policy routing (``ip rule``, routes in tables of their
own), sysctls set with ``sysctl -w``, processes. What comes back is only what the machine's /etc holds and what is
enabled in it. Here that is:

* every ``net.*`` key of ``/etc/sysctl.d/*.conf`` (systemd-sysctl.service applies them at boot, in name order;
  the other keys are the shared host kernel's, not the simulated relay's);
* the ``ExecStart=`` lines of the NAT units enabled in ``/etc/systemd/system/*.wants/``: Debian's
  ``nftables.service`` (``nft -f /etc/nftables.conf``, shipped disabled), ``netfilter-persistent.service``
  and the units relay-setup installs (``inverse-cloud-*.service``);
* the long-running services that answer on the relay's public ports, when enabled there (:data:`SERVICES`:
  ``sslh.service`` for ``relay-setup --ssh-on-443``, ``nginx.service`` for ``--nat none``/``--nat sni``), as
  :func:`boot_services`: their ``ExecStart=`` with the ``EnvironmentFile=`` read and ``$VAR``/``${VAR}``
  expanded as systemd does (``$VAR`` alone splits into words, ``${VAR}`` stays one), and whether the unit forks
  (``Type=forking``: the command returns once the daemon runs) or runs in the foreground.

Other enabled units (cron, getty...) are not run: they have nothing to do with whether the relay forwards
80/443. ssh.service is not read here: the world starts the relay's sshd itself, after the rest.

:func:`boot_commands` and :func:`boot_services` are pure (read files, run nothing), so a test can show what
boot would do and run it in the relay's own namespaces.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NAT_UNITS", "SERVICES", "BootService", "boot_commands", "boot_services", "environment_file",
           "exec_starts", "expand_environment", "sysctl_settings"]

NAT_UNITS = ("nftables.service", "netfilter-persistent.service")
SERVICES = ("sslh.service", "nginx.service")
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


@dataclass(frozen=True)
class BootService:
    """One enabled service as boot starts it: ``argv`` (expanded), ``forking``: the command returns once the
    daemon runs (``Type=forking``); otherwise it is the daemon and runs until stopped."""

    name: str
    argv: list[str]
    forking: bool


def _service_key(unit_text: str, key: str) -> list[str]:
    in_service, out = False, []
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_service = line == "[Service]"
        elif in_service and line.startswith(f"{key}="):
            out.append(line.split("=", 1)[1].strip())
    return out


def environment_file(text: str) -> dict[str, str]:
    """``KEY=value`` lines of an ``EnvironmentFile=`` (comments and blank lines skipped, one level of quotes
    removed), as systemd reads them."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand_environment(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's expansion in ``ExecStart=``: a word that is exactly ``$VAR`` becomes the value split at
    whitespace (no words if it is empty or unset); ``${VAR}`` inside a word is replaced by the value as is."""
    out: list[str] = []
    for word in argv:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out += env.get(whole.group(1), "").split()
        else:
            out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return out


def boot_services(etc: Path) -> list[BootService]:
    """The :data:`SERVICES` enabled in ``etc`` (``*.wants/`` symlinks), in that order, as boot starts them.
    Raises FileNotFoundError for an enabled unit without a unit file, or a required EnvironmentFile missing."""
    root = etc.parent
    enabled = {link.name for link in (etc / "systemd" / "system").glob("*.wants/*.service")}
    out = []
    for name in SERVICES:
        if name not in enabled:
            continue
        text = _unit_text(root, name) or _unit_text(Path("/"), name)
        if text is None:
            raise FileNotFoundError(f"{name} is enabled in {etc} but no unit file exists")
        env: dict[str, str] = {}
        for spec in _service_key(text, "EnvironmentFile"):
            optional, path = spec.startswith("-"), spec.lstrip("-")
            file = root / path.lstrip("/")          # the relay's own /etc, as the relay sees /etc/...
            if not file.is_file():
                if optional:
                    continue
                raise FileNotFoundError(f"{name}: EnvironmentFile {path} is missing in {etc}")
            env.update(environment_file(file.read_text(encoding="utf-8")))
        forking = "forking" in _service_key(text, "Type")
        for argv in exec_starts(text):
            out.append(BootService(name, expand_environment(argv, env), forking))
    return out
