"""Relay-side text for ``inverse-cloud relay-setup`` (pure: no I/O, no clock).

What the relay gets, and why:

* a system user whose every key line has a forced command (so its ``/bin/sh`` login shell can only ever
  run those commands: sshd runs a forced command through the login shell, ``nologin`` would refuse it);
* ``authorized_keys`` with two keys:
  - the tunnel key: ``restrict,port-forwarding,permitlisten=...`` for exactly the two ports and
    ``command="/bin/false"`` (a session on it runs nothing);
  - the takeover key: ``restrict,command=...`` whose forced command ends the tunnel user's *other* sshd
    sessions. After a network change the relay keeps the dead session and its forwarded port until
    ClientAlive fires (and not at all while something keeps connecting to the port); the laptop uses
    this key when its listen is refused, then reconnects ;
* an sshd ``Match User`` drop-in: ``AllowTcpForwarding remote`` (``restrict,port-forwarding`` alone
  re-enables *local* forwards, OpenSSH regress/forward-control.sh), ``PermitListen``, ``PermitOpen none``,
  no TTY/X11/agent, ClientAlive 15 s x 3 (sshd drops a silent client at the fourth silent interval: ~60 s;
  measured 107-120 s for a frozen laptop whose kernel still acknowledges, never while phones connect). The
  laptop does not depend on it: it notices its own network changes and resumes (docs/tunnel.md has the
  seconds per fault).
  No ``ForceCommand``: it would override the takeover command;
* public 80/443 mapped onto the forwarded ports with DNAT (client address preserved), as nftables and
  iptables, or nginx on a relay whose 80/443 already serve something (SNI routing, no TLS termination);
* an idempotent ``setup.sh`` for ``--apply`` that checks ``sshd -t`` before reloading sshd.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass

from inverse_cloud.tunnel import relay_front, relay_sni
from inverse_cloud.tunnel.relay_divert import divert_chain, divert_routes, localhost_check
from inverse_cloud.tunnel.relay_nat6 import nftables6_rules, permit6

__all__ = [
    "RelaySpec",
    "authorized_keys",
    "bundle",
    "iptables_rules",
    "login_refusal",
    "nat_unit",
    "nftables_rules",
    "nginx_http_vhost",
    "nginx_stream",
    "readme",
    "setup_script",
    "sshd_dropin",
    "sslh_config",
    "sslh_setup",
    "takeover_command",
]

# The forced command of the takeover key, run by sh on the relay as the tunnel user. $PPID is this
# session's own sshd process (it forked the shell), so every other sshd process of the user -- the
# per-session child that holds a stale forwarded listener -- is ended, and its port freed at once.
# ``sshd-session`` is the per-session binary's name from OpenSSH 9.8 on. No double quotes: the text
# sits inside command="..." in authorized_keys.
_TAKEOVER = ("n=0; for p in $(pgrep -u $(id -u) -x 'sshd|sshd-session'); do "
             "[ $p = $PPID ] || { kill $p && n=$((n+1)); }; done; "
             "echo inverse-cloud takeover: ended $n other session'(s)'")


@dataclass(frozen=True)
class RelaySpec:
    """Everything the relay-side text depends on."""

    domain: str
    user: str
    tunnel_key: str            # OpenSSH public key line of [relay] key_file
    takeover_key: str          # OpenSSH public key line of [relay] takeover_key_file
    listen_host: str = "127.0.0.1"
    https_port: int = 44353
    http_port: int = 8053
    client_alive_interval_s: int = 15
    client_alive_count_max: int = 3
    authorized_keys_file: str = ""   # default: /etc/ssh/inverse-cloud/<user>.keys
    home: str = ""                   # default: /var/lib/<user>
    dropin_path: str = ""            # default: /etc/ssh/sshd_config.d/inverse-cloud-<user>.conf
    ssh_on_443: bool = False         # sslh on public 443: SSH to sshd, TLS to the https forward (no 443 DNAT);
                                     # with --nat sni the nginx router sends what is not TLS to sshd
    sshd_port: int = 22              # where sslh (or nginx) hands SSH over (the relay's own sshd)
    proxy_protocol: bool = False     # nginx stream sends a PROXY header to both upstreams (client addresses)
    ipv6: bool = False               # sslh / nginx stream also listen on [::]:443 (a v6 listener, no ip6 NAT)
    listen_host6: str = ""           # the laptop's second pair of forwards, for the ip6 NAT (relay_nat6.py)
    sslh_transparent: bool = False   # sslh connects from the client's address; needs relay_divert.py's routing
    #                                  (with ipv6, listen_host must be 127.0.0.1 and listen_host6 "::": sslh's
    #                                  targets are localhost, relay_divert.py)

    @property
    def keys_path(self) -> str:
        return self.authorized_keys_file or f"/etc/ssh/inverse-cloud/{self.user}.keys"

    @property
    def home_dir(self) -> str:
        return self.home or f"/var/lib/{self.user}"

    @property
    def dropin(self) -> str:
        return self.dropin_path or f"/etc/ssh/sshd_config.d/inverse-cloud-{self.user}.conf"

    @property
    def listen_is_loopback(self) -> bool:
        if self.listen_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return False


def login_refusal(user: str, admin: str | None = None) -> str | None:
    """Why ``user`` cannot be the tunnel login (None when it can). setup.sh gives that account no password,
    ``/bin/sh`` and keys that only forward: root, or the admin who runs ``--apply``, would be locked out."""
    if user == "root":
        return ("[relay] user is root: setup.sh would wipe root's password and leave it only the tunnel key; "
                "the tunnel needs an account of its own, e.g. inverse-cloud (root belongs in --apply root@RELAY)")
    if admin is not None and user == admin:
        return (f"[relay] user {user} is the admin given to --apply: setup.sh would lock that login to the "
                "tunnel key; use an account of its own for the tunnel, e.g. inverse-cloud")
    return None


def _key_body(line: str) -> str:
    """``type base64 [comment]`` -> ``type base64 comment`` with a safe one-line comment."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError(f"not an OpenSSH public key line: {line[:40]!r}")
    comment = parts[2].replace("\n", " ") if len(parts) > 2 else ""
    return " ".join([parts[0], parts[1]] + ([comment] if comment else []))


def takeover_command() -> str:
    return _TAKEOVER


def authorized_keys(spec: RelaySpec) -> str:
    listen = ",".join([f'permitlisten="{spec.listen_host}:{p}"' for p in (spec.https_port, spec.http_port)]
                      + [f'permitlisten="{h}"' for h in permit6(spec.listen_host6, (spec.https_port, spec.http_port))])
    return (
        f"# inverse-cloud keys for {spec.domain}; installed as {spec.keys_path} (root-owned, 0644)\n"
        "# Tunnel key: the two reverse forwards and nothing else (a session runs /bin/false).\n"
        f'restrict,port-forwarding,{listen},command="/bin/false" {_key_body(spec.tunnel_key)}\n'
        "# Takeover key: can only end this user's other sshd sessions (a stale one holding the ports).\n"
        f'restrict,command="{_TAKEOVER}" {_key_body(spec.takeover_key)}\n'
    )


def sshd_dropin(spec: RelaySpec) -> str:
    return (
        f"# {spec.dropin} -- generated by `inverse-cloud relay-setup` for {spec.domain}.\n"
        "# Only the tunnel user gets forwarding, and only reverse forwards on its two ports.\n"
        f"Match User {spec.user}\n"
        f"    AuthorizedKeysFile {spec.keys_path}\n"
        "    AuthenticationMethods publickey\n"
        "    PasswordAuthentication no\n"
        "    KbdInteractiveAuthentication no\n"
        "    # remote only: restrict,port-forwarding in authorized_keys would also allow -L (forward-control.sh)\n"
        "    AllowTcpForwarding remote\n"
        f"    PermitListen {spec.listen_host}:{spec.https_port} {spec.listen_host}:{spec.http_port}"
        + "".join(f" {h}" for h in permit6(spec.listen_host6, (spec.https_port, spec.http_port))) + "\n"
        "    PermitOpen none\n"
        "    # clientspecified: the laptop asks for "
        f"{spec.listen_host}; the NAT below maps public 443/80 there\n"
        "    GatewayPorts clientspecified\n"
        "    AllowAgentForwarding no\n"
        "    AllowStreamLocalForwarding no\n"
        "    X11Forwarding no\n"
        "    PermitTTY no\n"
        "    PermitTunnel no\n"
        "    PermitUserRC no\n"
        "    # A session that stops answering is dropped (and its ports freed) after "
        f"{spec.client_alive_interval_s * (spec.client_alive_count_max + 1)} s at the earliest (the silent interval "
        "after the last probe)\n"
        f"    ClientAliveInterval {spec.client_alive_interval_s}\n"
        f"    ClientAliveCountMax {spec.client_alive_count_max}\n"
        "    # no ForceCommand here: it would override the takeover key's command\n"
    )


def _dnat_target(spec: RelaySpec, port: int) -> str:
    return f"{'127.0.0.1' if spec.listen_host == 'localhost' else spec.listen_host}:{port}"


def nftables_rules(spec: RelaySpec) -> str:
    """The seed post's scheme: public 443 -> https forward, 80 -> http forward, DNAT in PREROUTING (phones)
    and OUTPUT (the relay itself), so the phone's address stays the source the laptop sees."""
    https, http = _dnat_target(spec, spec.https_port), _dnat_target(spec, spec.http_port)
    sysctl = ("# DNAT to a loopback address needs: sysctl -w net.ipv4.conf.all.route_localnet=1\n"
              if spec.listen_is_loopback else "")
    return (
        f"# inverse-cloud NAT for {spec.domain}: public :443 -> {https}, public :80 -> {http}\n"
        + ("# Load: nft -f THIS_FILE (replaces only the inverse_cloud tables). IPv4 and IPv6 (the ip6 table).\n"
           if spec.listen_host6 else
           "# Load: nft -f THIS_FILE (replaces only the inverse_cloud table). IPv4 only: publish no AAAA record.\n") +
        f"{sysctl}"
        "table ip inverse_cloud\n"
        "delete table ip inverse_cloud\n"
        "table ip inverse_cloud {\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        + ("" if spec.ssh_on_443 else f"        fib daddr type local tcp dport 443 dnat to {https}\n") +
        f"        fib daddr type local tcp dport 80 dnat to {http}\n"
        "    }\n"
        "    chain output {\n"
        "        type nat hook output priority -100; policy accept;\n"
        + ("" if spec.ssh_on_443 else f"        fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 443 dnat to "
                                      f"{https}\n") +
        f"        fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 80 dnat to {http}\n"
        "    }\n"
        "    chain input {\n"
        "        # With loopback routing on, a neighbour on the segment could reach 127.0.0.1 services\n"
        "        # (CVE-2020-8558): only packets this table DNAT-ed may arrive there from outside.\n"
        "        type filter hook input priority filter; policy accept;\n"
        "        iif != \"lo\" ip daddr 127.0.0.0/8 ct status & dnat == 0 drop\n"
        "    }\n"
        + (divert_chain((spec.sshd_port, spec.https_port)) if spec.sslh_transparent else "") +
        "}\n"
        + (nftables6_rules(spec.domain, spec.listen_host6, spec.https_port, spec.http_port,
                           map_443=not spec.ssh_on_443,
                           divert_ports=(spec.sshd_port, spec.https_port) if spec.sslh_transparent else ())
           if spec.listen_host6 else "")
    )


def iptables_rules(spec: RelaySpec) -> str:
    """The same scheme as ``iptables-restore --noflush`` input (its own chains, so reloads are idempotent)."""
    https, http = _dnat_target(spec, spec.https_port), _dnat_target(spec, spec.http_port)
    return (
        f"# inverse-cloud NAT for {spec.domain} (iptables-restore --noflush < THIS_FILE)\n"
        + ("# needs: sysctl -w net.ipv4.conf.all.route_localnet=1\n" if spec.listen_is_loopback else "")
        + "*nat\n"
        ":INVERSE_CLOUD_PRE - [0:0]\n"
        ":INVERSE_CLOUD_OUT - [0:0]\n"
        "-F INVERSE_CLOUD_PRE\n"
        "-F INVERSE_CLOUD_OUT\n"
        + ("" if spec.ssh_on_443 else
           f"-A INVERSE_CLOUD_PRE -p tcp -m addrtype --dst-type LOCAL --dport 443 -j DNAT --to-destination {https}\n")
        + f"-A INVERSE_CLOUD_PRE -p tcp -m addrtype --dst-type LOCAL --dport 80 -j DNAT --to-destination {http}\n"
        + ("" if spec.ssh_on_443 else f"-A INVERSE_CLOUD_OUT -p tcp ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL "
                                      f"--dport 443 -j DNAT --to-destination {https}\n")
        + f"-A INVERSE_CLOUD_OUT -p tcp ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL --dport 80 "
        f"-j DNAT --to-destination {http}\n"
        "COMMIT\n"
        "# With loopback routing on, a neighbour could reach 127.0.0.1 services (CVE-2020-8558): drop what\n"
        "# was not DNAT-ed.\n"
        "*filter\n"
        ":INVERSE_CLOUD_IN - [0:0]\n"
        "-F INVERSE_CLOUD_IN\n"
        "-A INVERSE_CLOUD_IN ! -i lo -d 127.0.0.0/8 -m conntrack ! --ctstate DNAT -j DROP\n"
        "COMMIT\n"
    )


def nginx_http_vhost(spec: RelaySpec) -> str:
    """Port 80 shared with nginx's other sites (:func:`inverse_cloud.tunnel.relay_front.nginx_http_text`)."""
    return relay_front.nginx_http_text(_front(spec))


def nginx_stream(spec: RelaySpec) -> str:
    """Port 443 shared with an existing HTTPS server (:func:`inverse_cloud.tunnel.relay_front.nginx_stream_text`)."""
    return relay_front.nginx_stream_text(_front(spec))


def _front(spec: RelaySpec) -> relay_front.FrontSpec:
    return relay_front.FrontSpec(domain=spec.domain, https_target=_dnat_target(spec, spec.https_port),
                                 http_target=_dnat_target(spec, spec.http_port), sshd_port=spec.sshd_port,
                                 proxy_protocol=spec.proxy_protocol, ipv6=spec.ipv6,
                                 sslh_transparent=spec.sslh_transparent)


def sslh_config(spec: RelaySpec, listen: str = "0.0.0.0", public_port: int = 443) -> str:  # noqa: S104
    """``/etc/sslh.cfg`` for Debian's sslh (:func:`inverse_cloud.tunnel.relay_front.sslh_config_text`)."""
    return relay_front.sslh_config_text(_front(spec), listen, public_port)


def sslh_setup(spec: RelaySpec) -> str:
    """The setup.sh part that installs :func:`sslh_config`."""
    return relay_front.sslh_setup_text(_front(spec))


def readme(spec: RelaySpec, nat: str = "nft") -> str:
    # sshd ends a client when its count of silent intervals goes ABOVE ClientAliveCountMax: interval x (count + 1)
    alive = spec.client_alive_interval_s * (spec.client_alive_count_max + 1)
    return (
        f"What the relay needs for {spec.domain} (review, then run setup.sh as root on the relay,\n"
        "or let `inverse-cloud relay-setup --apply ADMIN@RELAY` do it):\n"
        "\n"
        f"1. A system user {spec.user!r} with /bin/sh as shell (every key line has a forced command, so the\n"
        "   shell only ever runs those) and no password.\n"
        f"2. {spec.keys_path}: the tunnel key (reverse forwards to {spec.listen_host}:{spec.https_port} and\n"
        f"   {spec.listen_host}:{spec.http_port} only) and the takeover key (ends this user's stale sessions).\n"
        f"3. {spec.dropin}: the sshd Match block (Debian's sshd_config includes sshd_config.d/*.conf).\n"
        + ("4. --nat none: setup.sh leaves public 443 and 80 to your nginx. Install nginx-stream.conf and\n"
           "   nginx-http.conf as their first lines say, then `nginx -t && nginx -s reload` (SNI routing:\n"
           "   the relay still never decrypts anything).\n" if nat == "none" else
           f"4. Public 443 -> {spec.https_port} and 80 -> {spec.http_port}: nftables.conf (or iptables.rules),\n"
           "   DNAT keeps the phone's address; inverse-cloud-nat.service (enabled) loads them again at boot.\n"
           "   If 80/443 already serve a web site, use --nat none (nginx-http.conf and\n"
           "   nginx-stream.conf instead: SNI routing, the relay still never decrypts anything).\n") +
        "   Several laptops on one relay (--nat sni): nginx takes public 443 (by server name, a PROXY header\n"
        "   naming the phone) and 80 (by Host) for all of them, each laptop with its own tunnel user, ports and\n"
        f"   record in {relay_sni.SITES}; a name no laptop carries is closed.\n"
        + (relay_sni.SSH_README if spec.ssh_on_443 and nat == "sni" else "") +
        "\n"
        "When the laptop is offline nothing listens on the forwarded ports: the relay's 443 refuses the\n"
        "connection (nginx variant: closes it). Phones report \"server unreachable\" and retry later; the\n"
        "relay never answers with an HTTP error page a client could take for \"collection gone\".\n"
        "\n"
        + ("IPv6: the ip6 table of nftables.conf maps public [v6]:443/80 onto the forwards the laptop also binds on\n"
           f"[{spec.listen_host6}] ([relay] listen_host6): publish the relay's AAAA record too.\n"
           if spec.listen_host6 and not spec.ssh_on_443 else
           "IPv6: sslh / nginx also listen on [::]:443 (--ipv6; nginx's port-80 site on [::]:80 too): publish\n"
           "the relay's AAAA record too.\n"
           if spec.ipv6 else
           "IPv6: these rules cover IPv4 only. Publish an A record for the domain and NO AAAA record: a\n"
           "half-working AAAA makes phones on IPv6 fail intermittently (--ipv6 with --ssh-on-443 or\n"
           "--nat none adds a v6 listener).\n") +
        "\n"
        f"A dead laptop session is dropped after {alive} s at the earliest (ClientAlive; later, or never, while\n"
        "phones keep connecting to its port); the laptop does not wait for that: when its listen is refused\n"
        "it ends the stale session with the takeover key and reconnects. It notices a change of its own\n"
        "network at once (netlink) and a freeze or suspend on resume: measured with a real sshd in network\n"
        "namespaces, a phone's next request worked 1.1-1.3 s after the laptop's address changed (20.5-20.9 s\n"
        "with keepalives alone) and 0.5-1.3 s after an outage's end, a resume or an sshd restart.\n"
        "The relay sees the server name (SNI), timing and sizes, never contents or passwords.\n"
    )


# The comment (GECOS) of the account setup.sh creates: how a later run knows the account is its own.
MARK = "inverse-cloud tunnel"


def nat_unit() -> str:
    """A oneshot unit that loads the NAT rules at boot, after nftables.service (which flushes the ruleset)."""
    return (
        "# /etc/systemd/system/inverse-cloud-nat.service -- generated by `inverse-cloud relay-setup`\n"
        "[Unit]\n"
        "Description=inverse-cloud NAT: public 80/443 to the tunnel's forwarded ports\n"
        "After=nftables.service netfilter-persistent.service systemd-sysctl.service\n"
        "Before=network-pre.target\n"
        "Wants=network-pre.target\n"
        "DefaultDependencies=no\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "ExecStart=/bin/sh /etc/inverse-cloud/nat-load.sh\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def setup_script(spec: RelaySpec, nat: str = "nft") -> str:
    """An idempotent script for root on the relay. ``nat`` is nft | iptables | none | sni (the shared router of
    several laptops: :mod:`inverse_cloud.tunnel.relay_sni`)."""
    if nat not in ("nft", "iptables", "none", "sni"):
        raise ValueError(f"nat must be nft, iptables, none or sni, not {nat!r}")
    q = shlex.quote
    keys, dropin = authorized_keys(spec), sshd_dropin(spec)
    # The NAT must come back after the relay reboots: the rules are loaded by a loader script that a unit of
    # our own runs at boot (Debian ships nftables.service disabled, and iptables rules are not saved at all).
    nat_block = {
        "nft": ("NAT_FILE=/etc/inverse-cloud/nat.nft\n"
                "write_file \"$NAT_FILE\" 0644 <<'INVERSE_CLOUD_EOF'\n" + nftables_rules(spec)
                + "INVERSE_CLOUD_EOF\n"
                "write_file \"$NAT_LOADER\" 0755 <<'INVERSE_CLOUD_EOF'\n"
                "#!/bin/sh\n# loads the inverse-cloud NAT rules (run by inverse-cloud-nat.service at boot)\n"
                "set -eu\nnft -f /etc/inverse-cloud/nat.nft\n"
                + (divert_routes(ipv6=bool(spec.listen_host6)) if spec.sslh_transparent else "") +
                "INVERSE_CLOUD_EOF\n"
                # nftables.service (if enabled) flushes the whole ruleset: the include keeps our table in it
                "if [ -f /etc/nftables.conf ] && ! grep -q \"$NAT_FILE\" /etc/nftables.conf; then\n"
                "    echo \"include \\\"$NAT_FILE\\\"\" >> /etc/nftables.conf\n"
                "fi\n"),
        "iptables": ("NAT_FILE=/etc/inverse-cloud/nat.iptables\n"
                     "write_file \"$NAT_FILE\" 0644 <<'INVERSE_CLOUD_EOF'\n" + iptables_rules(spec)
                     + "INVERSE_CLOUD_EOF\n"
                     "write_file \"$NAT_LOADER\" 0755 <<'INVERSE_CLOUD_EOF'\n"
                     "#!/bin/sh\n# loads the inverse-cloud NAT rules (run by inverse-cloud-nat.service at boot)\n"
                     "set -eu\n"
                     "iptables-restore --noflush < /etc/inverse-cloud/nat.iptables\n"
                     "iptables -t nat -C PREROUTING -j INVERSE_CLOUD_PRE 2>/dev/null || "
                     "iptables -t nat -A PREROUTING -j INVERSE_CLOUD_PRE\n"
                     "iptables -t nat -C OUTPUT -j INVERSE_CLOUD_OUT 2>/dev/null || "
                     "iptables -t nat -A OUTPUT -j INVERSE_CLOUD_OUT\n"
                     "iptables -C INPUT -j INVERSE_CLOUD_IN 2>/dev/null || iptables -I INPUT -j INVERSE_CLOUD_IN\n"
                     "INVERSE_CLOUD_EOF\n"),
        "none": "echo 'NAT not touched (--nat none): map public 443/80 yourself (see README)'\n",
        "sni": relay_sni.sni_setup(spec.ipv6, spec.sshd_port if spec.ssh_on_443 else None),
    }[nat]
    if nat not in ("none", "sni"):
        nat_block += (
            "write_file /etc/systemd/system/inverse-cloud-nat.service 0644 <<'INVERSE_CLOUD_EOF'\n"
            + nat_unit() + "INVERSE_CLOUD_EOF\n"
            "sh \"$NAT_LOADER\"\n"
            "if command -v systemctl >/dev/null; then\n"
            "    systemctl daemon-reload 2>/dev/null || true\n"
            "    systemctl enable --quiet inverse-cloud-nat.service\n"
            "else\n"
            "    echo 'warning: no systemctl: run /etc/inverse-cloud/nat-load.sh at boot yourself' >&2\n"
            "fi\n")
    localnet = ("write_file /etc/sysctl.d/60-inverse-cloud.conf 0644 <<'INVERSE_CLOUD_EOF'\n"
                "net.ipv4.conf.all.route_localnet = 1\n"
                "INVERSE_CLOUD_EOF\n"
                "sysctl -q -p /etc/sysctl.d/60-inverse-cloud.conf\n")
    if not spec.listen_is_loopback or nat in ("none", "sni"):
        localnet = ""
    return (
        "#!/bin/sh\n"
        f"# inverse-cloud relay set-up for {spec.domain}: idempotent, run as root on the relay.\n"
        "set -eu\n"
        f"U={q(spec.user)}\n"
        f"KEYS={q(spec.keys_path)}\n"
        f"DROPIN={q(spec.dropin)}\n"
        "NAT_LOADER=/etc/inverse-cloud/nat-load.sh\n"
        f"DOMAIN={q(spec.domain)}\n"
        f"HTTPS_AT={q(_dnat_target(spec, spec.https_port))}\n"
        f"HTTP_AT={q(_dnat_target(spec, spec.http_port))}\n"
        f"SITES={relay_sni.SITES}\n"
        f"DROPINS={relay_sni.DROPINS}\n"
        "[ \"$(id -u)\" = 0 ] || { echo 'run as root' >&2; exit 1; }\n"
        "command -v pgrep >/dev/null || { echo 'pgrep (procps) is needed by the takeover key' >&2; exit 1; }\n"
        "write_file() {  # write_file PATH MODE < content: atomic, root-owned\n"
        "    mkdir -p \"$(dirname \"$1\")\"\n"
        "    cat > \"$1.tmp.$$\"\n"
        "    chmod \"$2\" \"$1.tmp.$$\"; chown root:root \"$1.tmp.$$\"\n"
        "    mv -f \"$1.tmp.$$\" \"$1\"\n"
        "}\n"
        # the other laptops this relay carries: refuse a clash before anything changes
        + relay_sni.sites_check(nat) + (localhost_check() if spec.sslh_transparent and spec.ipv6 else "") +
        # Never take over an account: root, or a person's login, would lose its password and shell here.
        "if id -u \"$U\" >/dev/null 2>&1; then\n"
        "    if [ \"$(id -u \"$U\")\" = 0 ]; then\n"
        "        echo \"refusing: $U is root (uid 0) on the relay; the tunnel login must be an account of its own, "
        "e.g. inverse-cloud\" >&2\n"
        "        exit 1\n"
        "    fi\n"
        "    case \"$(getent passwd \"$U\" | cut -d: -f5)\" in\n"
        f"        {q(MARK)}*) ;;\n"
        "        *) echo \"refusing: the account $U already exists on the relay and was not created by inverse-cloud "
        "relay-setup; choose another relay user (e.g. inverse-cloud)\" >&2; exit 1;;\n"
        "    esac\n"
        "fi\n"
        "if ! id -u \"$U\" >/dev/null 2>&1; then\n"
        f"    useradd --system --home-dir {q(spec.home_dir)} --no-create-home --shell /bin/sh "
        f"--comment {q(MARK)} \"$U\"\n"
        "fi\n"
        "# forced commands run through the login shell; '*': no password, yet not 'locked' (OpenSSH\n"
        "# refuses '!'-locked accounts when UsePAM is off)\n"
        "usermod --shell /bin/sh -p '*' \"$U\"\n"
        "write_file \"$KEYS\" 0644 <<'INVERSE_CLOUD_EOF'\n" + keys + "INVERSE_CLOUD_EOF\n"
        "OLD=\"\"\n"
        "if [ -f \"$DROPIN\" ]; then OLD=\"$DROPIN.bak.$$\"; cp -p \"$DROPIN\" \"$OLD\"; fi\n"
        "write_file \"$DROPIN\" 0644 <<'INVERSE_CLOUD_EOF'\n" + dropin + "INVERSE_CLOUD_EOF\n"
        "if ! grep -Eqi '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config.d/\\*\\.conf' "
        "/etc/ssh/sshd_config; then\n"
        "    echo \"warning: /etc/ssh/sshd_config has no 'Include /etc/ssh/sshd_config.d/*.conf'; \"\\\n"
        "         \"add it at the top\" >&2\n"
        "fi\n"
        "mkdir -p /run/sshd\n"
        "if ! sshd -t; then\n"
        "    echo 'sshd -t failed: restoring the previous drop-in, sshd not reloaded' >&2\n"
        "    if [ -n \"$OLD\" ]; then mv -f \"$OLD\" \"$DROPIN\"; else rm -f \"$DROPIN\"; fi\n"
        "    exit 1\n"
        "fi\n"
        "[ -z \"$OLD\" ] || rm -f \"$OLD\"\n"
        "systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || "
        "kill -HUP \"$(cat /run/sshd.pid)\"\n"
        + localnet + nat_block + (sslh_setup(spec) if spec.ssh_on_443 and nat != "sni" else "") +  # sni: nginx
        "echo \"inverse-cloud: relay ready for user $U\"\n"
    )


def bundle(spec: RelaySpec, nat: str = "nft") -> dict[str, str]:
    """File name -> content, in the order ``relay-setup`` shows them."""
    if nat == "sni":
        return {
            "README.txt": readme(spec, nat),
            "authorized_keys": authorized_keys(spec),
            "sshd_config.d/inverse-cloud.conf": sshd_dropin(spec),
            "nginx-sni-stream.conf": relay_sni.stream_frame(),
            "nginx-sni-http.conf": relay_sni.http_frame(),
            **({"nginx-sni-ssh.conf": relay_sni.ssh_route_review(spec.sshd_port)} if spec.ssh_on_443 else {}),
            **({"nginx-sni-listen6.conf": relay_sni.listen6_review()} if spec.ipv6 else {}),
            "setup.sh": setup_script(spec, nat),
        }
    return {
        "README.txt": readme(spec, nat),
        "authorized_keys": authorized_keys(spec),
        "sshd_config.d/inverse-cloud.conf": sshd_dropin(spec),
        "nftables.conf": nftables_rules(spec),
        "iptables.rules": iptables_rules(spec),
        "inverse-cloud-nat.service": nat_unit(),
        "nginx-http.conf": nginx_http_vhost(spec),
        "nginx-stream.conf": nginx_stream(spec),
        "setup.sh": setup_script(spec, nat),
        **({"sslh.cfg": sslh_config(spec)} if spec.ssh_on_443 else {}),
    }
