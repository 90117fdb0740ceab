"""``inverse-cloud relay-setup``.

relay-setup renders what the relay needs (:mod:`inverse_cloud.tunnel.relay_files`), prints it or writes
it (``--output``) or applies it over SSH as an admin (``--apply``), then fetches the relay's host key, shows its SHA256
fingerprint for the user to confirm, and pins it in the config file (a one-line text edit).

A variant may need new [relay] settings on the laptop (``fallback_port`` for --ssh-on-443, ``listen_host6`` for
--ipv6, ``proxy_protocol`` for --nat sni and --proxy-protocol). They must not reach the config before the relay
carries the matching side, or a working tunnel breaks until then: ``--apply`` sets them after setup.sh succeeded
there; ``--output`` writes them into the bundle (laptop.toml) and leaves the config alone, and ``--adopt DIR``,
run once setup.sh succeeded on the relay, sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from inverse_cloud.config import Config, parse_user_host
from inverse_cloud.errors import ConfigError, HostKeyMismatch, InverseCloudError, TunnelError
from inverse_cloud.tunnel import relay_files as relay

__all__ = ["SETTINGS_FILE", "add_commands", "adopt_settings", "fetch_host_key", "set_config_value", "settings_changes",
           "variant_problem", "wanted_settings"]

SETTINGS_FILE = "laptop.toml"   # in an --output bundle: the [relay] settings its relay side expects


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
                 ) -> None:
    """Add ``relay-setup`` to the inverse-cloud parser."""
    p = sub.add_parser(
        "relay-setup", parents=[common],
        help="print (or apply) what the relay needs, and pin the relay's SSH host key",
        description="Renders the relay's user, authorized_keys, sshd Match block and NAT rules for review; "
                    "then fetches the relay's host key, shows its fingerprint and pins it in the config.")
    p.add_argument("--output", metavar="DIR", help="write the files into DIR instead of printing them, with the "
                   f"[relay] settings the variant needs here in DIR/{SETTINGS_FILE}; the config is left as it is "
                   "until --adopt DIR (default: print them)")
    p.add_argument("--adopt", metavar="DIR", help=f"after setup.sh from an --output DIR succeeded on the relay: set "
                   f"the [relay] settings DIR/{SETTINGS_FILE} holds in the config, and nothing else (default: no)")
    p.add_argument("--apply", metavar="ADMIN@RELAY[:PORT]",
                   help="run the generated setup.sh on the relay over ssh as ADMIN (root, or sudo without "
                        "password); idempotent; checks `sshd -t` before reloading sshd (default: do not apply)")
    p.add_argument("--nat", choices=["nft", "iptables", "none", "sni"], default="nft",
                   help="how setup.sh maps public 443/80 to the forwarded ports (default: nft; 'none' when "
                        "80/443 are used by a web server: see nginx-*.conf; 'sni' for several laptops on one "
                        "relay: nginx routes 443 by server name and 80 by Host, each laptop with its own tunnel "
                        "user and ports; the laptop gets [relay] proxy_protocol = true: with --apply once "
                        "setup.sh ran, with --output through --adopt)")
    p.add_argument("--yes", action="store_true", help="accept the fetched host key without asking")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="replace a pinned host key that differs (the relay was rebuilt)")
    p.add_argument("--no-pin", action="store_true", help="do not contact the relay; only render the files")
    p.add_argument("--client-alive-interval", type=int, default=15, metavar="S",
                   help="relay sshd ClientAliveInterval for the tunnel user (default 15)")
    p.add_argument("--client-alive-count-max", type=int, default=3, metavar="N",
                   help="relay sshd ClientAliveCountMax (default 3: sshd drops a silent client when its count of "
                        "silent intervals goes above N, so a dead session goes after interval x (N + 1) at the "
                        "earliest, 60 s; measured 107-120 s for a frozen laptop)")
    p.add_argument("--authorized-keys-file", metavar="PATH", default="",
                   help="where the relay keeps the tunnel user's keys (default /etc/ssh/inverse-cloud/USER.keys)")
    p.add_argument("--ssh-on-443", action="store_true",
                   help="also put the relay's SSH on public 443 behind sslh, or with --nat sni in its nginx router "
                        "(for laptops in networks that block outbound SSH); the laptop gets [relay] "
                        "fallback_port = 443 (--apply: once setup.sh ran; --output: through --adopt)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="with --nat none: nginx-stream.conf sends a PROXY header to the laptop and the existing "
                        "site, so both see the visitor's address (with --ssh-on-443: sslh 2 sends it); the laptop gets "
                        "[relay] proxy_protocol = true (--apply: once setup.sh ran; --output: through --adopt)")
    p.add_argument("--ipv6", action="store_true",
                   help="also serve phones on IPv6 (publish an AAAA record then): with --nat nft an ip6 table maps "
                        "[v6]:443/80 onto a second pair of forwards the laptop binds on [::] ([relay] "
                        "listen_host6 = \"::\", set like the others); with --ssh-on-443 sslh, with --nat none "
                        "nginx, also listen on [::]:443 (default: IPv4 only)")
    p.set_defaults(func=cmd_relay_setup)


# --- config text edit ---------------------------------------------------------------------------------

def set_config_value(text: str, section: str, key: str, literal: str) -> str:
    """Set ``key = literal`` inside ``[section]`` of TOML ``text``, replacing the key's line (or its
    commented-out default line), else adding it right after the header. Everything else is untouched."""
    lines = text.splitlines(keepends=True)
    start = None
    for i, line in enumerate(lines):
        m = re.match(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$", line)
        if m:
            if start is not None:
                end = i
                break
            if m.group(1) == section:
                start = i
    else:
        end = len(lines)
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}\n[{section}]\n{key} = {literal}\n"
    new = f"{key} = {literal}\n"
    for pattern in (rf"^\s*{re.escape(key)}\s*=", rf"^\s*#\s*{re.escape(key)}\s*="):
        for i in range(start + 1, end):
            if re.match(pattern, lines[i]):
                lines[i] = new
                return "".join(lines)
    lines.insert(start + 1, new)
    return "".join(lines)


def _toml_string(value: str) -> str:
    return json.dumps(value)   # a JSON string is a valid TOML basic string


# --- host key -----------------------------------------------------------------------------------------

# Preference when fetching: ed25519 first (what sshd on Debian offers), RSA last.
FETCH_ALGS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
              "rsa-sha2-512", "rsa-sha2-256"]


def fetch_host_key(host: str, port: int, timeout_s: float = 15.0) -> str:
    """The relay's host key as an OpenSSH public key line (``ssh-ed25519 AAAA...``).

    :raises TunnelError: the relay cannot be reached or sent no key.
    """
    import asyncssh

    async def fetch() -> asyncssh.SSHKey | None:
        return await asyncio.wait_for(asyncssh.get_server_host_key(
            host, port, config=None, server_host_key_algs=FETCH_ALGS), timeout_s)

    from inverse_cloud.ops.netprobe import describe

    try:
        key = asyncio.run(fetch())
    except (OSError, TimeoutError) as exc:
        raise TunnelError(f"cannot fetch the host key of relay {host}:{port}: {describe(exc)}; is sshd running "
                          "there, and is the port open in the provider's firewall?") from None
    except asyncssh.Error as exc:
        raise TunnelError(f"cannot fetch the host key of relay {host}:{port}: the SSH handshake failed "
                          f"({exc.reason or type(exc).__name__}); is it an SSH server?") from None
    if key is None:
        raise TunnelError(f"relay {host}:{port} sent no host key")
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def fingerprint(key_line: str) -> str:
    import asyncssh

    key = asyncssh.import_public_key(key_line)
    return f"{key.get_fingerprint('sha256')} ({key.get_algorithm()})"


def _same_key(a: str, b: str) -> bool:
    return a.split()[:2] == b.split()[:2]


def pin_host_key(cfg: Config, offered: str, *, yes: bool, accept_new: bool) -> bool:
    """Write ``offered`` into [relay] host_key after confirmation. True if the file changed.

    :raises HostKeyMismatch: another key is pinned and ``accept_new`` is not set.
    """
    assert cfg.path is not None
    fp = fingerprint(offered)
    if cfg.relay.host_key and _same_key(cfg.relay.host_key, offered):
        print(f"relay host key {fp} is already pinned in {cfg.path}")
        return False
    if cfg.relay.host_key and not accept_new:
        raise HostKeyMismatch(
            f"relay host key changed: expected {fingerprint(cfg.relay.host_key)}, got {fp}; if you rebuilt the "
            "relay run `inverse-cloud relay-setup --accept-new-host-key`")
    print(f"relay {cfg.relay.host}:{cfg.relay.port} host key: {fp}")
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("confirm the relay host key: check it on the relay with "
                              "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`, then run again with --yes")
        answer = input("Does it match `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the relay? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise ConfigError("host key not confirmed; nothing was pinned")
    from inverse_cloud.fsutil import atomic_write

    text = cfg.path.read_text(encoding="utf-8")
    atomic_write(cfg.path, set_config_value(text, "relay", "host_key", _toml_string(offered)).encode(), mode=0o600)
    print(f"pinned in {cfg.path}; restart `inverse-cloud serve` to use it")
    return True


# --- the command --------------------------------------------------------------------------------------

def _public_key(path: Path) -> str:
    pub = path.with_suffix(".pub") if path.with_suffix(".pub").exists() else Path(f"{path}.pub")
    try:
        return pub.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    import asyncssh

    try:
        return asyncssh.read_private_key(str(path)).export_public_key("openssh").decode().strip()
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"relay key {path} cannot be read ({exc}); run `inverse-cloud init` to create it") from None


def spec_for(cfg: Config, args: argparse.Namespace) -> relay.RelaySpec:
    return relay.RelaySpec(
        domain=cfg.server.domain, user=cfg.relay.user, tunnel_key=_public_key(cfg.relay.key_file),
        takeover_key=_public_key(cfg.relay.takeover_key_file), listen_host=cfg.relay.listen_host,
        https_port=cfg.relay.https_port, http_port=cfg.relay.http_port,
        client_alive_interval_s=args.client_alive_interval, client_alive_count_max=args.client_alive_count_max,
        authorized_keys_file=args.authorized_keys_file, ssh_on_443=bool(getattr(args, "ssh_on_443", False)),
        sshd_port=cfg.relay.port,
        proxy_protocol=bool(getattr(args, "proxy_protocol", False)) or getattr(args, "nat", "") == "sni",
        ipv6=bool(getattr(args, "ipv6", False)), listen_host6=_listen_host6(cfg, args),
        sslh_transparent=_sslh_transparent(args, cfg.relay.listen_host, _listen_host6(cfg, args)))


def _sslh_transparent(args: argparse.Namespace, listen_host: str, listen_host6: str) -> bool:
    """sslh passes the client's address on by transparent mode (relay_divert.py) when nothing else does: not with
    PROXY headers, and only with the nft loader (which also sets up the reply routing at boot). With --ipv6 sslh
    reaches both forward pairs as localhost (127.0.0.1 and ::1), so only when the laptop binds them there (its
    default listen hosts); other listen hosts keep sslh non-transparent."""
    return (bool(getattr(args, "ssh_on_443", False)) and not getattr(args, "proxy_protocol", False)
            and getattr(args, "nat", "nft") == "nft"
            and (not getattr(args, "ipv6", False) or (listen_host == "127.0.0.1" and listen_host6 == "::")))


def _listen_host6(cfg: Config, args: argparse.Namespace) -> str:
    """Where the laptop binds its IPv6 forwards: only the nft variant maps IPv6 onto them (relay_nat6.py)."""
    if not getattr(args, "ipv6", False) or getattr(args, "nat", "nft") != "nft":
        return ""
    return cfg.relay.listen_host6 or "::"


def apply_over_ssh(target: str, script: str) -> None:
    """Run ``script`` on the relay as ADMIN through the user's own OpenSSH client.

    :raises InverseCloudError: ssh or the script failed (its last line is shown).
    """
    user, host, port = parse_user_host(target, "--apply")
    remote = "sh -s" if user == "root" else "sudo -n sh -s"
    proc = subprocess.run(["ssh", "-p", str(port), "-o", "ConnectTimeout=15", f"{user}@{host}", remote],
                          input=script, text=True, capture_output=True, timeout=300, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise InverseCloudError(f"applying the relay set-up on {host} as {user} failed: {last}")


# --- the laptop's [relay] settings a variant needs ----------------------------------------------------

# key -> why the tunnel needs it; the only keys --adopt writes.
_WHY = {
    "fallback_port": "the tunnel tries it when [relay] port is blocked",
    "listen_host6": "the tunnel also binds its forwards there, for phones on IPv6",
    "proxy_protocol": "connections through the tunnel must start with a PROXY header",
}


def wanted_settings(spec: relay.RelaySpec) -> dict[str, int | str | bool]:
    """The [relay] settings the relay side rendered from ``spec`` expects of the laptop (pure)."""
    wanted: dict[str, int | str | bool] = {}
    if spec.ssh_on_443:
        wanted["fallback_port"] = 443
    if spec.listen_host6:
        wanted["listen_host6"] = spec.listen_host6
    if spec.proxy_protocol:
        wanted["proxy_protocol"] = True
    return wanted


def _literal(value: int | str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _toml_string(value) if isinstance(value, str) else str(value)


def settings_changes(cfg: Config, wanted: dict[str, int | str | bool]) -> dict[str, str]:
    """key -> TOML literal for each wanted [relay] setting the config does not have yet (pure)."""
    return {key: _literal(value) for key, value in wanted.items() if getattr(cfg.relay, key) != value}


def adopt_settings(cfg: Config, changes: dict[str, str]) -> None:
    """Write ``changes`` into [relay] of the config (one atomic write, checked by loading it first), one line
    each; "already set" when there is nothing to change.

    :raises ConfigError: the edited text would not load.
    """
    from inverse_cloud.config import loads
    from inverse_cloud.fsutil import atomic_write

    assert cfg.path is not None
    if not changes:
        print(f"the [relay] settings this relay side needs are already set in {cfg.path}")
        return
    text = cfg.path.read_text(encoding="utf-8")
    for key, literal in changes.items():
        text = set_config_value(text, "relay", key, literal)
    loads(text, cfg.path)
    atomic_write(cfg.path, text.encode(), mode=0o600)
    for key, literal in changes.items():
        print(f"set [relay] {key} = {literal} in {cfg.path}: {_WHY[key]}; restart `inverse-cloud serve` to use it")


def render_settings(cfg: Config, wanted: dict[str, int | str | bool], adopt_command: str) -> str:
    """The bundle's laptop.toml: for whom it was rendered, and the [relay] settings its relay side expects."""
    lines = ["# The laptop's [relay] settings that this bundle's relay side expects. Once setup.sh succeeded on the",
             f"# relay, run: {adopt_command}",
             f"domain = {_toml_string(cfg.server.domain)}", f"user = {_toml_string(cfg.relay.user)}", "", "[relay]"]
    lines += [f"{key} = {_literal(value)}" for key, value in wanted.items()]
    return "\n".join(lines) + "\n"


def read_settings(cfg: Config, folder: Path) -> dict[str, int | str | bool]:
    """The [relay] settings of ``folder``/laptop.toml, refused unless it was rendered for this laptop.

    :raises ConfigError: no such file, not TOML, another domain or tunnel user, or a key --adopt never writes.
    """
    path = folder / SETTINGS_FILE
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {SETTINGS_FILE}; give the folder `relay-setup --output` wrote") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if (doc.get("domain"), doc.get("user")) != (cfg.server.domain, cfg.relay.user):
        raise ConfigError(f"{path} was written for {doc.get('domain')} (tunnel user {doc.get('user')}), but "
                          f"{cfg.path} is {cfg.server.domain} (tunnel user {cfg.relay.user}); run relay-setup "
                          "--output again with this config")
    section = doc.get("relay")
    wanted = section if isinstance(section, dict) else {}
    for key in wanted:
        if key not in _WHY:
            raise ConfigError(f"{path}: [relay] {key} is not a setting relay-setup adopts (only "
                              f"{', '.join(_WHY)})")
    return wanted


def variant_problem(nat: str, *, ssh_on_443: bool, ipv6: bool, proxy_protocol: bool) -> str | None:
    """Why a combination of relay variants cannot be built, or None (pure)."""
    if proxy_protocol and nat not in ("none", "sni") and not ssh_on_443:
        return ("--proxy-protocol needs --nat none (nginx) or --ssh-on-443 (sslh): with DNAT of 443 a phone reaches "
                "the forwarded port directly and could send a PROXY header naming any address")
    if ipv6 and nat == "iptables":
        return ("--ipv6 with DNAT needs --nat nft (its ip6 table maps IPv6 onto the laptop's [::] forwards); the "
                "iptables rules cover IPv4 only")
    return None


def _adopt_command(cfg: Config, folder: Path) -> str:
    from inverse_cloud.config import default_config_path

    where = "" if cfg.path == default_config_path() else f" --config {cfg.path}"
    return f"inverse-cloud relay-setup{where} --adopt {folder}"


def _adopt_alone(args: argparse.Namespace) -> None:
    given = [flag for flag, on in (("--output", args.output), ("--apply", args.apply), ("--ipv6", args.ipv6),
                                   ("--ssh-on-443", args.ssh_on_443), ("--proxy-protocol", args.proxy_protocol),
                                   ("--nat", args.nat != "nft")) if on]
    if given:
        raise ConfigError(f"--adopt DIR goes alone: it sets what DIR/{SETTINGS_FILE} says, and the variant was "
                          f"chosen by the relay-setup --output that wrote DIR (drop {', '.join(given)})")


def cmd_relay_setup(args: argparse.Namespace) -> int:
    from inverse_cloud.config import load_config

    cfg = load_config(args)
    if args.adopt:
        _adopt_alone(args)
        adopt_settings(cfg, settings_changes(cfg, read_settings(cfg, Path(args.adopt).expanduser())))
        return 0
    if not cfg.relay.host:
        raise ConfigError(f"{cfg.path}: [relay] host is empty; set it (or run `inverse-cloud init --relay "
                          "USER@HOST`) first")
    if not 1 <= args.client_alive_interval <= 3600 or not 1 <= args.client_alive_count_max <= 100:
        raise ConfigError("--client-alive-interval must be 1-3600 and --client-alive-count-max 1-100")
    problem = variant_problem(args.nat, ssh_on_443=args.ssh_on_443, ipv6=args.ipv6,
                              proxy_protocol=args.proxy_protocol)
    if problem:
        raise ConfigError(problem)
    admin = parse_user_host(args.apply, "--apply")[0] if args.apply else None
    refusal = relay.login_refusal(cfg.relay.user, admin)
    if refusal:
        raise ConfigError(f"{cfg.path}: {refusal}")
    spec = spec_for(cfg, args)
    files = relay.bundle(spec, args.nat)
    wanted = wanted_settings(spec)
    if args.output:
        from inverse_cloud.fsutil import atomic_write

        out = Path(args.output).expanduser().absolute()
        adopt = _adopt_command(cfg, out)
        files = {**files, SETTINGS_FILE: render_settings(cfg, wanted, adopt)}
        if wanted:   # a user who follows the bundle alone must not leave the laptop without them
            files["README.txt"] += (f"\nThe laptop: {SETTINGS_FILE} holds the [relay] settings this relay side "
                                    f"needs there\n({', '.join(sorted(wanted))}). Once setup.sh succeeded on "
                                    f"the relay, run on the laptop:\n    {adopt}\n")
        for name, content in files.items():
            atomic_write(out / name, content.encode(), mode=0o755 if name.endswith(".sh") else 0o644)
        print(f"wrote {', '.join(files)} to {out}")
        changes = settings_changes(cfg, wanted)
        if changes and not args.apply:
            print(f"after setup.sh succeeded on the relay, run `{adopt}` to set "
                  f"{', '.join(f'[relay] {k} = {v}' for k, v in changes.items())} here")
    elif not args.apply:
        for name, content in files.items():
            print(f"===== {name} " + "=" * max(0, 60 - len(name)))
            print(content)
    if args.apply:
        apply_over_ssh(args.apply, files["setup.sh"])   # raises when setup.sh failed: the config stays as it was
        changes = settings_changes(cfg, wanted)
        if changes:
            adopt_settings(cfg, changes)
    if args.no_pin:
        return 0
    offered = fetch_host_key(cfg.relay.host, cfg.relay.port, cfg.relay.connect_timeout_s)
    pin_host_key(cfg, offered, yes=args.yes, accept_new=args.accept_new_host_key)
    return 0
