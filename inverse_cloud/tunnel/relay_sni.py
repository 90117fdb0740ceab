"""Several laptops on one relay: the shared SNI router (``relay-setup --nat sni``), as text (pure: no I/O).

Every laptop on a relay has its own tunnel user (so the takeover key, which ends the *user's* other sshd
sessions, can only ever end that laptop's stale sessions), its own forwarded ports, and one record on the
relay, ``/etc/inverse-cloud/sites/<user>.site``: ``user domain https-forward http-forward proxy``. Public 443
and 80 belong to nginx, shared by all of them:

* 443: nginx ``stream`` reads the TLS ClientHello's server name (``ssl_preread``, no TLS termination) and
  connects to that laptop's https forward, with a PROXY header naming the phone (the laptop parses it on
  tunnel connections: ``[relay] proxy_protocol = true``). A name no laptop carries, or none at all, goes to
  a Unix socket nobody listens on: nginx closes the connection, never hands it to some laptop.
  TLS-ALPN-01 validation is a TLS handshake for the domain, so it is routed like a phone.
* 443 with ``--ssh-on-443``: a connection whose first bytes are no TLS ClientHello (an SSH client speaks
  first, "SSH-2.0-...") has an empty ``$ssl_preread_protocol``; it goes to the relay's own sshd through an
  inner server that takes the PROXY header off (sshd does not read one). sshd then sees every such
  connection as 127.0.0.1. The route is relay-wide, in ``/etc/inverse-cloud/ssh-route``: written when a
  laptop asks for it, left alone by a laptop that does not (another laptop may rely on it).
* 80: nginx ``http``, one ``server_name`` per domain proxying to that laptop's http forward: ACME HTTP-01
  reaches the right laptop by Host.
* IPv6 (``--ipv6``): relay-wide too, in ``/etc/inverse-cloud/listen6``: ``listen [::]:443`` for the public
  server and ``listen [::]:80`` for every laptop's port-80 site (a CA that validates HTTP-01 over the AAAA
  record must reach the laptop's server name there, not nginx's default site). Written when a laptop asks for
  it, left alone by a laptop that does not, so a second laptop without ``--ipv6`` keeps the first one's
  IPv6 phones.

A relay set up before, with one laptop and DNAT of 443/80 (``--nat nft|iptables``), is migrated when the
second laptop's setup.sh runs: the existing laptop's record is made from its sshd drop-in (domain, user,
ports), with ``proxy 0``, because that laptop does not expect a PROXY header until its own ``relay-setup
--nat sni`` sets ``proxy_protocol``. Its connections go through a small inner nginx server that reads the
header and connects on without one. Then nginx takes 443/80 and the DNAT is emptied.

Refused with one line, before anything on the relay changes: a tunnel user that carries another domain, a
domain carried by another user, a forwarded port another laptop uses (with a free pair to set), and a DNAT
set-up (``--nat nft|iptables``) on a relay that already carries another laptop.
"""

from __future__ import annotations

__all__ = ["LISTEN6", "SITES", "SSH_ROUTE", "http_frame", "listen6", "listen6_review", "sites_check", "sni_setup",
           "ssh_route", "stream_frame", "write_site_function"]

SITES = "/etc/inverse-cloud/sites"
DROPINS = "/etc/ssh/sshd_config.d"
SOCKETS = "/run/inverse-cloud"
STREAM_CONF = "/etc/nginx/inverse-cloud/stream.conf"
HTTP_CONF = "/etc/nginx/conf.d/inverse-cloud.conf"
SSH_ROUTE = "/etc/inverse-cloud/ssh-route"       # relay-wide: SSH on the shared 443 (--ssh-on-443)
LISTEN6 = "/etc/inverse-cloud/listen6"           # relay-wide: the [::]:443 and [::]:80 listeners (--ipv6)
# the bundle README's line for it
SSH_README = ("   SSH on that 443 (--ssh-on-443): what is not TLS goes to this relay's sshd, which sees it from\n"
              "   127.0.0.1 (fail2ban cannot tell those clients apart; port 22 still shows real addresses).\n")


def sites_check(mode: str) -> str:
    """Shell (POSIX sh) that lists the laptops the relay carries and refuses a clash with this one.

    Expects ``U DOMAIN HTTPS_AT HTTP_AT`` set, and ``SITES`` / ``DROPINS`` (the record folder, the sshd drop-in
    folder: variables so a test can point them elsewhere). ``mode`` is the ``--nat`` value: only ``sni`` may
    share the relay with another laptop.
    """
    share = ("" if mode == "sni" else
             "        { echo \"refusing: this relay already carries $d (relay user $u) on its public 443/80; a second "
             "laptop needs the shared router: run relay-setup --nat sni\"; return; }\n")
    return (
        "ic_sites() {  # one line per laptop the relay carries: user domain https-forward http-forward proxy\n"
        "    for f in \"$SITES\"/*.site; do [ -f \"$f\" ] && cat \"$f\"; done\n"
        "    # relays set up before the shared router: the laptop's sshd drop-in names domain, user and ports\n"
        "    for f in \"$DROPINS\"/inverse-cloud-*.conf; do\n"
        "        [ -f \"$f\" ] || continue\n"
        "        u=$(sed -n 's/^Match User \\([^ ]*\\)$/\\1/p' \"$f\" | head -n 1)\n"
        "        [ -n \"$u\" ] && [ ! -f \"$SITES/$u.site\" ] || continue\n"
        "        d=$(sed -n '1s/.* for \\([^ ]*\\)\\.$/\\1/p' \"$f\")\n"
        "        l=$(sed -n 's/^ *PermitListen \\([^ ]*\\) \\([^ ]*\\)$/\\1 \\2/p' \"$f\" | head -n 1)\n"
        "        [ -n \"$d\" ] && [ -n \"$l\" ] && echo \"$u $d $l 0\"\n"
        "    done\n"
        "}\n"
        "ic_clash() {  # the first reason this laptop cannot join, or nothing\n"
        "    mine_s=${HTTPS_AT##*:}; mine_h=${HTTP_AT##*:}; max_s=$mine_s; max_h=$mine_h; taken=''\n"
        "    while read -r u d s h p; do\n"
        "        if [ \"$u\" = \"$U\" ]; then\n"
        "            [ \"$d\" = \"$DOMAIN\" ] || { echo \"refusing: relay user $U already carries $d; give this "
        "laptop its own tunnel user: set [relay] user (e.g. $U-2) and run relay-setup again\"; return; }\n"
        "            continue\n"
        "        fi\n"
        "        [ \"$d\" != \"$DOMAIN\" ] || { echo \"refusing: $DOMAIN is already carried by relay user $u; one "
        "domain has one laptop (set [relay] user = \\\"$u\\\" on the laptop that owns it)\"; return; }\n"
        "        case \" ${s##*:} ${h##*:} \" in\n"
        "            *\" $mine_s \"*|*\" $mine_h \"*) taken=\"$d (relay user $u) forwards ports ${s##*:} and "
        "${h##*:}\";;\n"
        "        esac\n"
        "        [ \"${s##*:}\" -le \"$max_s\" ] || max_s=${s##*:}\n"
        "        [ \"${h##*:}\" -le \"$max_h\" ] || max_h=${h##*:}\n"
        + share +
        "    done\n"
        "    [ -z \"$taken\" ] || echo \"refusing: $taken on this relay, and this laptop asks for $mine_s and "
        "$mine_h; set [relay] https_port = $((max_s + 1)) and http_port = $((max_h + 1)) in this laptop's config "
        "and run relay-setup again\"\n"
        "}\n"
        "CLASH=$(ic_sites | ic_clash)\n"
        "[ -z \"$CLASH\" ] || { echo \"$CLASH\" >&2; exit 1; }\n"
    )


def write_site_function() -> str:
    """``ic_write_site USER DOMAIN HTTPS_AT HTTP_AT PROXY``: the laptop's record and its nginx pieces.

    PROXY 1: the laptop reads a PROXY header (the public server sends one). PROXY 0 (a laptop migrated from
    DNAT): an inner server on a Unix socket takes the header off before the laptop's forward."""
    return (
        "ic_write_site() {\n"
        "    echo \"$1 $2 $3 $4 $5\" | write_file \"$SITES/$1.site\" 0644\n"
        "    if [ \"$5\" = 1 ]; then\n"
        "        echo \"    $2 $3;\" | write_file \"$SITES/$1.map\" 0644\n"
        "        rm -f \"$SITES/$1.stream\"\n"
        "    else\n"
        f"        echo \"    $2 unix:{SOCKETS}/plain-$1.sock;\" | write_file \"$SITES/$1.map\" 0644\n"
        "        write_file \"$SITES/$1.stream\" 0644 <<INVERSE_CLOUD_EOF\n"
        "# $2: this laptop does not read PROXY headers (set up before the shared router): take it off here\n"
        "server {\n"
        f"    listen unix:{SOCKETS}/plain-$1.sock proxy_protocol;\n"
        "    proxy_pass $3;\n"
        "    proxy_connect_timeout 5s;\n"
        "}\n"
        "INVERSE_CLOUD_EOF\n"
        "    fi\n"
        "    write_file \"$SITES/$1.http\" 0644 <<INVERSE_CLOUD_EOF\n"
        "# $2 on port 80: ACME HTTP-01 and redirects (the laptop sees nginx's address here)\n"
        "server {\n"
        "    listen 80;\n"
        f"    include {LISTEN6}/http*.conf;\n"
        "    server_name $2;\n"
        "    location / {\n"
        "        proxy_pass http://$4;\n"
        "        proxy_set_header Host \\$host;\n"
        "        proxy_connect_timeout 5s;\n"
        "        # laptop offline: close the connection, never an error page\n"
        "        proxy_intercept_errors on;\n"
        "        error_page 502 504 = @offline;\n"
        "    }\n"
        "    location @offline { return 444; }\n"
        "}\n"
        "INVERSE_CLOUD_EOF\n"
        "}\n"
    )


def stream_frame() -> str:
    """The shared public 443 (top level of nginx.conf): the same text whichever laptop writes it. The SSH route
    (:func:`ssh_route`) and the IPv6 listener (:func:`listen6`) come in through includes, so a laptop without
    ``--ssh-on-443`` or ``--ipv6`` keeps another's."""
    return (
        f"# {STREAM_CONF} -- generated by `inverse-cloud relay-setup --nat sni` (shared by every laptop;\n"
        f"# each one's name -> forward is in {SITES}/<user>.map). Included at the top level of nginx.conf.\n"
        "stream {\n"
        "    map $ssl_preread_server_name $inverse_cloud_by_name {\n"
        f"        include {SITES}/*.map;\n"
        "        # a name no laptop carries (or no name): nobody listens there, nginx closes the connection\n"
        f"        default unix:{SOCKETS}/unknown-name.sock;\n"
        "    }\n"
        "    # no TLS at all (empty: the first bytes are no ClientHello, as an SSH client's \"SSH-2.0-\"): the\n"
        f"    # relay's sshd if a laptop asked for SSH on 443 ({SSH_ROUTE}); else by server name\n"
        "    map $ssl_preread_protocol $inverse_cloud_upstream {\n"
        f"        include {SSH_ROUTE}/*.map;\n"
        "        default $inverse_cloud_by_name;\n"
        "    }\n"
        f"    include {SITES}/*.stream;\n"
        f"    include {SSH_ROUTE}/*.stream;\n"
        "    server {\n"
        "        listen 443;\n"
        f"        include {LISTEN6}/stream*.conf;\n"
        "        ssl_preread on;\n"
        "        proxy_pass $inverse_cloud_upstream;\n"
        "        # the phone's address, for the laptop's failed-login limits and logs\n"
        "        proxy_protocol on;\n"
        "        proxy_connect_timeout 5s;\n"
        "    }\n"
        "}\n"
    )


def ssh_route(sshd_port: int) -> dict[str, str]:
    """``--ssh-on-443`` on the shared router: file name (in :data:`SSH_ROUTE`) -> content. ``protocol.map``
    sends what is not TLS to an inner server, ``sshd.stream`` is that server: it reads the public server's
    PROXY header (dropping it: sshd does not speak PROXY) and connects to the relay's sshd on loopback.

    ``ssl_preread`` stops at the first byte that is no TLS handshake record and routes at once: SSH clients
    send their banner first, so they reach sshd without a wait. A client that waits for the server to speak
    first sends nothing: nginx 1.22 waits ``preread_timeout`` (30 s by default), then closes the connection
    without connecting anywhere (seen with a silent client: no upstream connect, closed at the timeout)."""
    return {
        "protocol.map": f'    "" unix:{SOCKETS}/ssh.sock;\n',
        "sshd.stream": (
            "# SSH on the shared 443 (relay-setup --nat sni --ssh-on-443): the public server's PROXY header is\n"
            "# taken off here, so sshd sees these connections from 127.0.0.1 (port 22 still shows real addresses)\n"
            "server {\n"
            f"    listen unix:{SOCKETS}/ssh.sock proxy_protocol;\n"
            f"    proxy_pass 127.0.0.1:{sshd_port};\n"
            "    proxy_connect_timeout 5s;\n"
            "}\n"),
    }


def listen6() -> dict[str, str]:
    """``--ipv6`` on the shared router: file name (in :data:`LISTEN6`) -> content."""
    return {"stream.conf": "listen [::]:443;\n", "http.conf": "listen [::]:80;\n"}


def listen6_review() -> str:
    """The bundle's copy of :func:`listen6`, one file to review."""
    return "".join(f"# {LISTEN6}/{name}\n{text}" for name, text in listen6().items())


def ssh_route_review(sshd_port: int) -> str:
    """The bundle's copy of :func:`ssh_route`, one file to review."""
    return "".join(f"# {SSH_ROUTE}/{name}\n{text}" for name, text in ssh_route(sshd_port).items())


def http_frame() -> str:
    return (f"# {HTTP_CONF} -- generated by `inverse-cloud relay-setup --nat sni`: port 80 of every laptop\n"
            f"include {SITES}/*.http;\n")


def sni_setup(ipv6: bool, ssh_port: int | None = None) -> str:
    """The setup.sh part for ``--nat sni``, after the user, keys and drop-in are in place. Expects
    ``U DOMAIN HTTPS_AT HTTP_AT SITES DROPINS`` and ``write_file``; ``ic_sites`` from :func:`sites_check`.
    ``ssh_port``: also route SSH on 443 to the relay's sshd there (``--ssh-on-443``)."""
    ssh = "".join(f"write_file {SSH_ROUTE}/{name} 0644 <<'INVERSE_CLOUD_EOF'\n{text}INVERSE_CLOUD_EOF\n"
                  for name, text in ssh_route(ssh_port).items()) if ssh_port is not None else ""
    v6 = "".join(f"write_file {LISTEN6}/{name} 0644 <<'INVERSE_CLOUD_EOF'\n{text}INVERSE_CLOUD_EOF\n"
                 for name, text in listen6().items()) if ipv6 else ""
    return (
        "command -v nginx >/dev/null || { echo 'nginx is not installed: apt install nginx libnginx-mod-stream "
        "(then run again)' >&2; exit 1; }\n"
        + write_site_function() +
        f"mkdir -p \"$SITES\" {SSH_ROUTE} {LISTEN6} {SOCKETS}\n"
        "write_file /etc/tmpfiles.d/inverse-cloud.conf 0644 <<'INVERSE_CLOUD_EOF'\n"
        f"d {SOCKETS} 0755 root root -\n"
        "INVERSE_CLOUD_EOF\n"
        "# laptops set up before the shared router keep working: their record comes from their drop-in\n"
        "ic_sites | while read -r u d s h p; do\n"
        "    [ -f \"$SITES/$u.site\" ] || [ \"$u\" = \"$U\" ] || { ic_write_site \"$u\" \"$d\" \"$s\" \"$h\" 0; "
        "echo \"moved $d (relay user $u) from DNAT to the shared router\"; }\n"
        "done\n"
        "ic_write_site \"$U\" \"$DOMAIN\" \"$HTTPS_AT\" \"$HTTP_AT\" 1\n"
        + ssh + v6 +
        f"write_file {STREAM_CONF} 0644 <<'INVERSE_CLOUD_EOF'\n" + stream_frame() + "INVERSE_CLOUD_EOF\n"
        f"write_file {HTTP_CONF} 0644 <<'INVERSE_CLOUD_EOF'\n" + http_frame() + "INVERSE_CLOUD_EOF\n"
        f"grep -q '^include {STREAM_CONF};' /etc/nginx/nginx.conf || "
        f"echo 'include {STREAM_CONF};' >> /etc/nginx/nginx.conf\n"
        "nginx -t -q || { echo 'nginx -t refuses the configuration (is libnginx-mod-stream installed?)' >&2; "
        "exit 1; }\n"
        "if [ -s /run/nginx.pid ] && kill -0 \"$(cat /run/nginx.pid)\" 2>/dev/null; then\n"
        "    nginx -s reload\n"
        "else\n"
        "    systemctl enable --quiet nginx 2>/dev/null || true\n"
        "    systemctl restart nginx 2>/dev/null || nginx\n"
        "fi\n"
        "# nginx has public 443/80 now: the DNAT of a single-laptop set-up goes (its files stay, empty, so an\n"
        "# include of them in /etc/nftables.conf still loads)\n"
        "if [ -f /etc/inverse-cloud/nat.nft ]; then\n"
        "    printf 'table ip inverse_cloud\\ndelete table ip inverse_cloud\\n' |\n"
        "        write_file /etc/inverse-cloud/nat.nft 0644\n"
        "    nft -f /etc/inverse-cloud/nat.nft\n"
        "fi\n"
        "if [ -f /etc/inverse-cloud/nat.iptables ]; then\n"
        "    for c in INVERSE_CLOUD_PRE INVERSE_CLOUD_OUT; do iptables -t nat -F \"$c\" 2>/dev/null || true; done\n"
        "    iptables -F INVERSE_CLOUD_IN 2>/dev/null || true\n"
        "    rm -f /etc/inverse-cloud/nat.iptables\n"
        "fi\n"
        "systemctl disable --quiet inverse-cloud-nat.service 2>/dev/null || true\n"
        "rm -f /etc/systemd/system/multi-user.target.wants/inverse-cloud-nat.service\n"
        "# nothing is DNAT-ed to loopback any more: loopback routing off again (CVE-2020-8558)\n"
        "if [ -f /etc/sysctl.d/60-inverse-cloud.conf ]; then\n"
        "    rm -f /etc/sysctl.d/60-inverse-cloud.conf\n"
        "    sysctl -q -w net.ipv4.conf.all.route_localnet=0\n"
        "fi\n"
    )
