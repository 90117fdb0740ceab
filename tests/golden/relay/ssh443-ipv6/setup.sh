#!/bin/sh
# inverse-cloud relay set-up for laptop.test: idempotent, run as root on the relay.
set -eu
U=ictunnel
KEYS=/etc/ssh/inverse-cloud/ictunnel.keys
DROPIN=/etc/ssh/sshd_config.d/inverse-cloud-ictunnel.conf
NAT_LOADER=/etc/inverse-cloud/nat-load.sh
DOMAIN=laptop.test
HTTPS_AT=127.0.0.1:44353
HTTP_AT=127.0.0.1:8053
SITES=/etc/inverse-cloud/sites
DROPINS=/etc/ssh/sshd_config.d
[ "$(id -u)" = 0 ] || { echo 'run as root' >&2; exit 1; }
command -v pgrep >/dev/null || { echo 'pgrep (procps) is needed by the takeover key' >&2; exit 1; }
write_file() {  # write_file PATH MODE < content: atomic, root-owned
    mkdir -p "$(dirname "$1")"
    cat > "$1.tmp.$$"
    chmod "$2" "$1.tmp.$$"; chown root:root "$1.tmp.$$"
    mv -f "$1.tmp.$$" "$1"
}
ic_sites() {  # one line per laptop the relay carries: user domain https-forward http-forward proxy
    for f in "$SITES"/*.site; do [ -f "$f" ] && cat "$f"; done
    # relays set up before the shared router: the laptop's sshd drop-in names domain, user and ports
    for f in "$DROPINS"/inverse-cloud-*.conf; do
        [ -f "$f" ] || continue
        u=$(sed -n 's/^Match User \([^ ]*\)$/\1/p' "$f" | head -n 1)
        [ -n "$u" ] && [ ! -f "$SITES/$u.site" ] || continue
        d=$(sed -n '1s/.* for \([^ ]*\)\.$/\1/p' "$f")
        l=$(sed -n 's/^ *PermitListen \([^ ]*\) \([^ ]*\)$/\1 \2/p' "$f" | head -n 1)
        [ -n "$d" ] && [ -n "$l" ] && echo "$u $d $l 0"
    done
}
ic_clash() {  # the first reason this laptop cannot join, or nothing
    mine_s=${HTTPS_AT##*:}; mine_h=${HTTP_AT##*:}; max_s=$mine_s; max_h=$mine_h; taken=''
    while read -r u d s h p; do
        if [ "$u" = "$U" ]; then
            [ "$d" = "$DOMAIN" ] || { echo "refusing: relay user $U already carries $d; give this laptop its own tunnel user: set [relay] user (e.g. $U-2) and run relay-setup again"; return; }
            continue
        fi
        [ "$d" != "$DOMAIN" ] || { echo "refusing: $DOMAIN is already carried by relay user $u; one domain has one laptop (set [relay] user = \"$u\" on the laptop that owns it)"; return; }
        case " ${s##*:} ${h##*:} " in
            *" $mine_s "*|*" $mine_h "*) taken="$d (relay user $u) forwards ports ${s##*:} and ${h##*:}";;
        esac
        [ "${s##*:}" -le "$max_s" ] || max_s=${s##*:}
        [ "${h##*:}" -le "$max_h" ] || max_h=${h##*:}
        { echo "refusing: this relay already carries $d (relay user $u) on its public 443/80; a second laptop needs the shared router: run relay-setup --nat sni"; return; }
    done
    [ -z "$taken" ] || echo "refusing: $taken on this relay, and this laptop asks for $mine_s and $mine_h; set [relay] https_port = $((max_s + 1)) and http_port = $((max_h + 1)) in this laptop's config and run relay-setup again"
}
CLASH=$(ic_sites | ic_clash)
[ -z "$CLASH" ] || { echo "$CLASH" >&2; exit 1; }
case "$(getent ahosts localhost | awk '{print $1}' | sort -u | tr '\n' ' ')" in
    *'127.0.0.1 '*'::1 '*|*'::1 '*'127.0.0.1 '*) ;;
    *) echo "localhost must resolve to both 127.0.0.1 and ::1 (sslh's targets with --ipv6): add the line '::1 localhost' or '127.0.0.1 localhost' that /etc/hosts lacks" >&2; exit 1;;
esac
if id -u "$U" >/dev/null 2>&1; then
    if [ "$(id -u "$U")" = 0 ]; then
        echo "refusing: $U is root (uid 0) on the relay; the tunnel login must be an account of its own, e.g. inverse-cloud" >&2
        exit 1
    fi
    case "$(getent passwd "$U" | cut -d: -f5)" in
        'inverse-cloud tunnel'*) ;;
        *) echo "refusing: the account $U already exists on the relay and was not created by inverse-cloud relay-setup; choose another relay user (e.g. inverse-cloud)" >&2; exit 1;;
    esac
fi
if ! id -u "$U" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/ictunnel --no-create-home --shell /bin/sh --comment 'inverse-cloud tunnel' "$U"
fi
# forced commands run through the login shell; '*': no password, yet not 'locked' (OpenSSH
# refuses '!'-locked accounts when UsePAM is off)
usermod --shell /bin/sh -p '*' "$U"
write_file "$KEYS" 0644 <<'INVERSE_CLOUD_EOF'
# inverse-cloud keys for laptop.test; installed as /etc/ssh/inverse-cloud/ictunnel.keys (root-owned, 0644)
# Tunnel key: the two reverse forwards and nothing else (a session runs /bin/false).
restrict,port-forwarding,permitlisten="127.0.0.1:44353",permitlisten="127.0.0.1:8053",permitlisten="[::]:44353",permitlisten="[::]:8053",command="/bin/false" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPdR/oJumYvxBj5EcrtzZ7CKnzQkJornglLlC0nU8PWb tunnel laptop.test
# Takeover key: can only end this user's other sshd sessions (a stale one holding the ports).
restrict,command="n=0; for p in $(pgrep -u $(id -u) -x 'sshd|sshd-session'); do [ $p = $PPID ] || { kill $p && n=$((n+1)); }; done; echo inverse-cloud takeover: ended $n other session'(s)'" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIkGPrKIDriY0NovBgUlqIKnU7vKVf01jD7MhuH3zs5N takeover
INVERSE_CLOUD_EOF
OLD=""
if [ -f "$DROPIN" ]; then OLD="$DROPIN.bak.$$"; cp -p "$DROPIN" "$OLD"; fi
write_file "$DROPIN" 0644 <<'INVERSE_CLOUD_EOF'
# /etc/ssh/sshd_config.d/inverse-cloud-ictunnel.conf -- generated by `inverse-cloud relay-setup` for laptop.test.
# Only the tunnel user gets forwarding, and only reverse forwards on its two ports.
Match User ictunnel
    AuthorizedKeysFile /etc/ssh/inverse-cloud/ictunnel.keys
    AuthenticationMethods publickey
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    # remote only: restrict,port-forwarding in authorized_keys would also allow -L (forward-control.sh)
    AllowTcpForwarding remote
    PermitListen 127.0.0.1:44353 127.0.0.1:8053 [::]:44353 [::]:8053
    PermitOpen none
    # clientspecified: the laptop asks for 127.0.0.1; the NAT below maps public 443/80 there
    GatewayPorts clientspecified
    AllowAgentForwarding no
    AllowStreamLocalForwarding no
    X11Forwarding no
    PermitTTY no
    PermitTunnel no
    PermitUserRC no
    # A session that stops answering is dropped (and its ports freed) after 60 s at the earliest (the silent interval after the last probe)
    ClientAliveInterval 15
    ClientAliveCountMax 3
    # no ForceCommand here: it would override the takeover key's command
INVERSE_CLOUD_EOF
if ! grep -Eqi '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config.d/\*\.conf' /etc/ssh/sshd_config; then
    echo "warning: /etc/ssh/sshd_config has no 'Include /etc/ssh/sshd_config.d/*.conf'; "\
         "add it at the top" >&2
fi
mkdir -p /run/sshd
if ! sshd -t; then
    echo 'sshd -t failed: restoring the previous drop-in, sshd not reloaded' >&2
    if [ -n "$OLD" ]; then mv -f "$OLD" "$DROPIN"; else rm -f "$DROPIN"; fi
    exit 1
fi
[ -z "$OLD" ] || rm -f "$OLD"
systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || kill -HUP "$(cat /run/sshd.pid)"
write_file /etc/sysctl.d/60-inverse-cloud.conf 0644 <<'INVERSE_CLOUD_EOF'
net.ipv4.conf.all.route_localnet = 1
INVERSE_CLOUD_EOF
sysctl -q -p /etc/sysctl.d/60-inverse-cloud.conf
NAT_FILE=/etc/inverse-cloud/nat.nft
write_file "$NAT_FILE" 0644 <<'INVERSE_CLOUD_EOF'
# inverse-cloud NAT for laptop.test: public :443 -> 127.0.0.1:44353, public :80 -> 127.0.0.1:8053
# Load: nft -f THIS_FILE (replaces only the inverse_cloud tables). IPv4 and IPv6 (the ip6 table).
# DNAT to a loopback address needs: sysctl -w net.ipv4.conf.all.route_localnet=1
table ip inverse_cloud
delete table ip inverse_cloud
table ip inverse_cloud {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local tcp dport 80 dnat to 127.0.0.1:8053
    }
    chain output {
        type nat hook output priority -100; policy accept;
        fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 80 dnat to 127.0.0.1:8053
    }
    chain input {
        # With loopback routing on, a neighbour on the segment could reach 127.0.0.1 services
        # (CVE-2020-8558): only packets this table DNAT-ed may arrive there from outside.
        type filter hook input priority filter; policy accept;
        iif != "lo" ip daddr 127.0.0.0/8 ct status & dnat == 0 drop
    }
    chain sslh_divert {
        # sslh transparent: replies of its targets go back to sslh on this machine (routing table 1443)
        type route hook output priority mangle; policy accept;
        ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8 tcp sport { 22, 44353 } meta mark set 0x1c
    }
}
# IPv6 for laptop.test: public [v6]:443/80 -> the forwards the laptop binds on [::]
table ip6 inverse_cloud
delete table ip6 inverse_cloud
table ip6 inverse_cloud {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local tcp dport 80 redirect to :8053
    }
    chain output {
        type nat hook output priority -100; policy accept;
        fib daddr type local ip6 daddr != ::1 tcp dport 80 redirect to :8053
    }
    chain input {
        # The forwards listen on a public address: from outside only what this table mapped gets there.
        type filter hook input priority filter; policy accept;
        iif != "lo" tcp dport { 44353, 8053 } ct status & dnat == 0 drop
    }
    chain sslh_divert {
        # sslh transparent: replies of its targets go back to sslh on this machine (routing table 1443)
        type route hook output priority mangle; policy accept;
        ip6 saddr ::1 ip6 daddr != ::1 tcp sport { 22, 44353 } meta mark set 0x1c
    }
}
INVERSE_CLOUD_EOF
write_file "$NAT_LOADER" 0755 <<'INVERSE_CLOUD_EOF'
#!/bin/sh
# loads the inverse-cloud NAT rules (run by inverse-cloud-nat.service at boot)
set -eu
nft -f /etc/inverse-cloud/nat.nft
ip rule del fwmark 0x1c lookup 1443 2>/dev/null || true
ip rule add fwmark 0x1c lookup 1443
ip route replace local 0.0.0.0/0 dev lo table 1443
ip -6 rule del fwmark 0x1c lookup 1443 2>/dev/null || true
ip -6 rule add fwmark 0x1c lookup 1443
ip -6 route replace local ::/0 dev lo table 1443
INVERSE_CLOUD_EOF
if [ -f /etc/nftables.conf ] && ! grep -q "$NAT_FILE" /etc/nftables.conf; then
    echo "include \"$NAT_FILE\"" >> /etc/nftables.conf
fi
write_file /etc/systemd/system/inverse-cloud-nat.service 0644 <<'INVERSE_CLOUD_EOF'
# /etc/systemd/system/inverse-cloud-nat.service -- generated by `inverse-cloud relay-setup`
[Unit]
Description=inverse-cloud NAT: public 80/443 to the tunnel's forwarded ports
After=nftables.service netfilter-persistent.service systemd-sysctl.service
Before=network-pre.target
Wants=network-pre.target
DefaultDependencies=no

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /etc/inverse-cloud/nat-load.sh

[Install]
WantedBy=multi-user.target
INVERSE_CLOUD_EOF
sh "$NAT_LOADER"
if command -v systemctl >/dev/null; then
    systemctl daemon-reload 2>/dev/null || true
    systemctl enable --quiet inverse-cloud-nat.service
else
    echo 'warning: no systemctl: run /etc/inverse-cloud/nat-load.sh at boot yourself' >&2
fi
command -v sslh >/dev/null || { echo 'sslh is not installed: apt install sslh (then run again)' >&2; exit 1; }
write_file /etc/sslh.cfg 0644 <<'INVERSE_CLOUD_EOF'
# /etc/sslh.cfg -- generated by `inverse-cloud relay-setup --ssh-on-443` for laptop.test.
# Debian: apt install sslh; /etc/default/sslh: DAEMON_OPTS="-F/etc/sslh.cfg" (no space);
# systemctl enable --now sslh
# Transparent: sslh connects to sshd and the tunnel from the client's own address, so the laptop sees
# the phone's address; nat.nft marks the replies and nat-load.sh routes them back to sslh.
# localhost (127.0.0.1 and ::1 in /etc/hosts): sslh connects an IPv4 client to 127.0.0.1 and an
# IPv6 client to ::1, so phones on either keep their address.
verbose: 0;
numeric: true;
transparent: true;
# SSH clients send their banner at once; a client silent this long is taken for SSH anyway
timeout: 3;
user: "sslh";
listen:
(
    { host: "0.0.0.0"; port: "443"; },
    { host: "::"; port: "443"; }
);
protocols:
(
    { name: "ssh"; service: "ssh"; host: "localhost"; port: "22"; },
    { name: "tls"; host: "localhost"; port: "44353"; sni_hostnames: [ "laptop.test" ]; }
);
on-timeout: "ssh";
INVERSE_CLOUD_EOF
sslh -F/etc/sslh.cfg -V >/dev/null || { echo 'sslh refuses /etc/sslh.cfg' >&2; exit 1; }
if [ -f /etc/default/sslh ]; then
    sed -i 's|^DAEMON_OPTS=.*|DAEMON_OPTS="-F/etc/sslh.cfg"|' /etc/default/sslh
fi
ic_start_sslh() {
    if [ -s /run/sslh.pid ] && kill -0 "$(cat /run/sslh.pid)" 2>/dev/null; then
        old=$(cat /run/sslh.pid); kill "$old"; n=0
        while kill -0 "$old" 2>/dev/null && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    fi
    sslh -F/etc/sslh.cfg --pidfile /run/sslh.pid </dev/null >/dev/null 2>/run/sslh.start || {
        cat /run/sslh.start >&2
        echo 'sslh did not start (no systemd here to start it): see the line above' >&2; exit 1; }
}
systemctl enable sslh 2>/dev/null || true
systemctl restart sslh 2>/dev/null || ic_start_sslh
echo "inverse-cloud: relay ready for user $U"
