"""A small simulated internet in network namespaces, without shortcuts on any path a user takes.

Hosts (each a named network namespace ``wo<role>-<pid>``; the internet hosts share one bridge)::

    internet 198.51.100.0/24, 2001:db8:1::/64 (a bridge in its own namespace)
      relay  198.51.100.10  2001:db8:1::10   relay.example.org: its own sshd on :22, a private /etc and /root
      dns    198.51.100.53   2001:db8:1::53  knot, authoritative for example.org and example.net
      ca     198.51.100.20   2001:db8:1::20  acme.example.net: Pebble on :14000, validating at port 80 of
                                             whatever the name resolves to (the relay's public address)
      phone  198.51.100.30                   vdirsyncer
      phone6                 2001:db8:1::31  a phone with only IPv6 (made on demand: :meth:`World.add_phone6`)
      router 198.51.100.2 | 192.168.7.1      masquerades the home network
    home 192.168.7.0/24
      laptop 192.168.7.2 (default route via the router): reaches the relay only by name, through the NAT

Each host also has a mount namespace of its own, made once and entered (with its network namespace) by every
command run there (``nsenter``, which execs: the pid stays the command's). Names: every host resolves through the
DNS server: its /etc/resolv.conf is bind-mounted by ``nameserver 198.51.100.53``, and the relay's private /etc
holds the same line. The zone starts with what a user has before the journey (the relay's own name, the
CA's); the records inverse-cloud tells the user to publish are added with :meth:`World.publish`, removed with
:meth:`World.unpublish`, as at a DNS provider (knot's zone transactions: the answer changes at once).

Trust: the laptop and the phone trust the world's CA as a device trusts Let's Encrypt: the system bundle
(/etc/ssl/certs/ca-certificates.crt) is bind-mounted, in their mount namespaces, by a copy that also holds
Pebble's roots (:meth:`World.trust_pebble`).

The laptop's user is root with a home of its own (``laptop_home``), bound on /root in its mount namespace (ssh
takes ``~`` from passwd, which says /root), and ``$HOME`` is set to it. Not a copy of /etc/passwd bound on
/etc/passwd: a file bind mount is detached whenever this machine's /etc/passwd is replaced (useradd and
userdel rename over it, as other tests do while the session's world lives), and ssh then took this
machine's /root (its known_hosts: "Host key verification failed"). Its /usr/local/bin is
an overlay, so what an install links there stays on the laptop.

The relay: /etc is a copy of this machine's (users, PAM, sshd's Debian defaults) with its own host keys, Debian's
stock sshd_config and Debian's stock /etc/hosts (``localhost`` is 127.0.0.1 and ::1, which a transparent sslh's
targets need with ``--ipv6``; this machine's may name only 127.0.0.1), /root a folder of its own
(``/root/.ssh/authorized_keys`` holds the admin's key, as a VPS provider installs it), /run a tmpfs, /var/www and
/var/log/nginx folders of its own (a site's files and nginx's logs are the relay's, not this machine's). ``relay-setup
--apply root@relay.example.org`` runs setup.sh there over the real ssh, unmodified. :meth:`World.reboot_relay` is a
reboot: every process in the relay's namespace is killed (by pid), the ruleset and the policy routing (``ip rule``,
routing tables of its own) flushed, the sysctls back at a fresh namespace's values, /run empty, and only what boot
would run comes back: the sysctl.d settings and the enabled NAT units of the relay's /etc, then its enabled sslh and
nginx services (integration/relay_boot.py), then sshd (ssh.service is enabled on Debian). There is no systemd in the
relay: ``systemctl enable`` works offline (it writes the relay's /etc), ``systemctl start``/``restart`` fail, so
setup.sh starts what it needs itself, as on any relay without a running systemd.

Packages: the relay shares this machine's /usr, so sslh's and nginx's binaries (and their users, in the copied
passwd) are there, but a fresh relay has neither running nor enabled: this machine's ``sslh.service`` and
``nginx.service`` links are removed from the copy, and /etc/default/sslh (the sslh package's file) too.
:meth:`World.relay_apt_install` models ``apt install sslh`` afterwards: the package's /etc/default/sslh, and
its unit enabled as Debian's postinst does.

Every process the world starts is stopped by pid; every namespace and veth it made is deleted on
close, also on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from relay_boot import boot_commands, boot_services, sysctl_settings

from tests.support import wait_until

__all__ = ["World", "world_session"]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ZONE = "example.org"
CA_ZONE = "example.net"
DOMAIN = f"contacts.{ZONE}"
RELAY_NAME = f"relay.{ZONE}"
CA_NAME = f"acme.{CA_ZONE}"
PEBBLE_PORT = 14000
DNS_ADDR = "198.51.100.53"
DNS_ADDR6 = "2001:db8:1::53"
TTL_S = 1


@dataclass(frozen=True)
class Host:
    role: str
    address: str          # IPv4 on its first interface (the internet, or the home network for the laptop)
    address6: str = ""


HOSTS = {
    "relay": Host("relay", "198.51.100.10", "2001:db8:1::10"),
    "dns": Host("dns", DNS_ADDR, DNS_ADDR6),
    "ca": Host("ca", "198.51.100.20", "2001:db8:1::20"),
    "phone": Host("phone", "198.51.100.30"),
    "phone6": Host("phone6", "", "2001:db8:1::31"),
    "router": Host("router", "198.51.100.2"),
    "laptop": Host("laptop", "192.168.7.2"),
}
ROUTER_LAN = "192.168.7.1"

# Each host's mount namespace, made once (persisted by a bind mount of its nsfs file) and entered by every
# command run on that host. $W is the world's folder.
_MOUNTS = {
    "relay": 'mount --bind "$W/relay/etc" /etc; mount --bind "$W/relay/root" /root; mount -t tmpfs tmpfs /run; '
             'mkdir -p /run/sshd; mount --bind "$W/relay/var-www" /var/www; '
             'mount --bind "$W/relay/var-log-nginx" /var/log/nginx',
    "laptop": 'mount --bind "$W/resolv.conf" /etc/resolv.conf; '
              'mount --bind "$W/trust.pem" /etc/ssl/certs/ca-certificates.crt; '
              'mount --bind "$W/laptop-home" /root; '
              'mount -t overlay overlay -o "lowerdir=/usr/local/bin,upperdir=$W/ulb/up,workdir=$W/ulb/work" '
              '/usr/local/bin',
    "phone": 'mount --bind "$W/resolv.conf" /etc/resolv.conf; '
             'mount --bind "$W/trust.pem" /etc/ssl/certs/ca-certificates.crt',
    "phone6": 'mount --bind "$W/resolv6.conf" /etc/resolv.conf; '
              'mount --bind "$W/trust.pem" /etc/ssl/certs/ca-certificates.crt',
}
_DEFAULT_MOUNTS = 'mount --bind "$W/resolv.conf" /etc/resolv.conf'

# Packages a fresh relay does not have set up (its binaries are this machine's /usr): the files under /etc they
# bring, and the units their postinst enables. nginx's /etc/nginx stays (setup.sh only adds to it).
RELAY_PACKAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sslh": (("default/sslh",), ("sslh.service",)),
    "nginx": ((), ("nginx.service",)),
}

# Debian 12's /etc/hosts as the installer writes it (netcfg), the host's own name on 127.0.1.1
DEBIAN_HOSTS = ("127.0.0.1\tlocalhost\n127.0.1.1\trelay\n\n"
                "# The following lines are desirable for IPv6 capable hosts\n"
                "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n")

DEBIAN_SSHD_CONFIG = """\
# Debian 12's /etc/ssh/sshd_config, its uncommented lines
Include /etc/ssh/sshd_config.d/*.conf
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def _run(*args: str, check: bool = True, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out  # type: ignore[no-any-return]


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def ca_and_leaf(ca_cn: str, name: str) -> tuple[bytes, bytes, bytes]:
    """A CA called ``ca_cn`` and a server certificate for ``name`` from it, and its key (PEM): a CA the world's
    clients trust as they trust a public one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_cn)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _pebble_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for acme.example.net: Pebble's own HTTPS listener (the ACME directory)."""
    d.mkdir(parents=True, exist_ok=True)
    paths = d / "wfe-ca.pem", d / "wfe.pem", d / "wfe.key"
    for path, pem in zip(paths, ca_and_leaf("test world ACME server CA", CA_NAME), strict=True):
        path.write_bytes(pem)
    os.chmod(paths[2], 0o600)
    return paths


@dataclass
class World:
    """The namespaces, the servers in them, and the verbs a journey needs. Build with :func:`world_session`."""

    root: Path
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    made_ns: list[str] = field(default_factory=list)
    pebble_starts: int = 0
    ns_mounted: bool = False
    extra_laptops: dict[str, str] = field(default_factory=dict)   # role -> its address (add_laptop)

    # --- names and paths ------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return f"wo{role}-{self.tag}"

    @property
    def relay_root(self) -> Path:
        return self.root / "relay"

    @property
    def relay_etc(self) -> Path:
        return self.relay_root / "etc"

    @property
    def laptop_home(self) -> Path:
        return self.root / "laptop-home"

    @property
    def trust_bundle(self) -> Path:
        return self.root / "trust.pem"

    @property
    def knot_conf(self) -> Path:
        return self.root / "dns" / "knot.conf"

    @property
    def acme_directory(self) -> str:
        return f"https://{CA_NAME}:{PEBBLE_PORT}/dir"

    # --- running things in hosts ----------------------------------------------------------------------

    def prefix(self, role: str, *, net: bool = True, cwd: Path | None = None) -> list[str]:
        """argv prefix that runs a command on ``role``: in its network namespace (``net``) and its mount
        namespace, in ``cwd`` (default: the laptop's home, else /; entering a mount namespace resets the working
        directory). nsenter execs the command, so the pid stays the command's."""
        wd = cwd or (self.home_of(role) if self.is_laptop(role) else Path("/"))
        return ["nsenter", *([f"--net=/run/netns/{self.ns(role)}"] if net else []),
                f"--mount={self.root / 'ns' / role}", f"--wd={wd}", "--"]

    def is_laptop(self, role: str) -> bool:
        return role == "laptop" or role in self.extra_laptops

    def home_of(self, role: str) -> Path:
        return self.laptop_home if role == "laptop" else self.root / f"{role}-home"

    def _make_mount_ns(self, role: str) -> None:
        path = self.root / "ns" / role
        path.touch()
        mounts = _MOUNTS.get(role, _DEFAULT_MOUNTS)
        if role in self.extra_laptops:
            # the laptop's mounts, with a home and a /usr/local/bin of its own
            mounts = (_MOUNTS["laptop"].replace('"$W/laptop-home" /root', f'"$W/{role}-home" /root')
                      .replace("$W/ulb/", f"$W/ulb-{role}/"))
        if self.is_laptop(role):
            # The home hides this machine's /root. The interpreter of the venv the tests run with may live
            # there (pyenv): it stays visible at its own path, bound into the home before the home is bound
            # (recursively) on /root.
            home = "laptop-home" if role == "laptop" else f"{role}-home"
            real = Path(os.path.realpath(sys.executable))
            if real.parts[:2] == ("/", "root") and len(real.parts) > 3:
                top = real.parts[2]
                keep = (f'mkdir -p "$W/{home}/{top}"; mount --bind "/root/{top}" "$W/{home}/{top}"; ')
                mounts = keep + mounts.replace(f'mount --bind "$W/{home}" /root', f'mount --rbind "$W/{home}" /root')
        _run("unshare", f"--mount={path}", "--propagation", "slave", "sh", "-c",
             "set -e; " + mounts, env={**os.environ, "W": str(self.root)})

    def _drop_mount_ns(self, role: str) -> None:
        path = self.root / "ns" / role
        _run("umount", str(path), check=False)

    def env(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "RADICALE_CONFIG")}
        if self.is_laptop(role):
            # root's login PATH on Debian (no ~/.local/bin), its home the laptop's
            env.update(HOME="/root" if role in self.extra_laptops else str(self.home_of(role)), USER="root",
                       LOGNAME="root",
                       PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            env.pop("PYTHONPATH", None)
            # this machine's user manager is not the laptop's: `service install` must never start a unit here
            for key in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS"):
                env.pop(key, None)
        return env

    def run(self, role: str, *argv: str, timeout: float = 120, input: str | None = None,  # noqa: A002
            check: bool = False, cwd: Path | None = None, net: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``role``. ``net=False``: in its mount namespace only (this machine's network: the
        laptop downloading packages from the real package index, which the world has not)."""
        kw: dict[str, object] = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        out = subprocess.run([*self.prefix(role, net=net, cwd=cwd), *argv], capture_output=True, text=True,
                             timeout=timeout, env=self.env(role), check=False, **kw)  # type: ignore[call-overload]
        if check and out.returncode != 0:
            raise RuntimeError(f"[{role}] {' '.join(argv)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def popen(self, name: str, role: str, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """A long-running process on ``role``, remembered under ``name`` and stopped by pid in :meth:`close`."""
        log = log or self.root / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen([*self.prefix(role), *argv], stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=self.env(role))
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(15)

    def call(self, role: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` with this thread in ``role``'s network namespace (its sockets live there)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{self.ns(role)}")
            try:
                return fn(*args)
            finally:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's namespace")
        finally:
            os.close(own)

    def tcp_open(self, role: str, host: str, port: int) -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return True
            except OSError:
                return False

        return self.call(role, probe)

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace")[-6000:] if p.exists() else ""

    # --- building -------------------------------------------------------------------------------------

    def _add_ns(self, role: str) -> None:
        name = self.ns(role)
        _run("ip", "netns", "add", name)
        self.made_ns.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _wire_internet(self, role: str) -> None:
        """veth ``eth0`` in ``role``, its peer on the internet bridge; addresses from HOSTS."""
        host, inet = HOSTS[role], self.ns("inet")
        peer = f"wo{role}"[:15]
        _run("ip", "-n", inet, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", self.ns(role))
        _run("ip", "-n", inet, "link", "set", peer, "master", "wobr0", "up")
        if host.address:
            _run("ip", "-n", self.ns(role), "addr", "add", f"{host.address}/24", "dev", "eth0")
        if host.address6:
            _run("ip", "-n", self.ns(role), "addr", "add", f"{host.address6}/64", "dev", "eth0", "nodad")
        _run("ip", "-n", self.ns(role), "link", "set", "eth0", "up")

    def build(self) -> None:
        ns_dir = self.root / "ns"
        ns_dir.mkdir()
        _run("mount", "--bind", str(ns_dir), str(ns_dir))  # a private mount: nsfs files can be bound under it
        _run("mount", "--make-private", str(ns_dir))
        self.ns_mounted = True
        (self.root / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\n")
        for d in ("ulb/up", "ulb/work"):
            (self.root / d).mkdir(parents=True)
        self._add_ns("inet")
        _run("ip", "-n", self.ns("inet"), "link", "add", "wobr0", "type", "bridge")
        _run("ip", "-n", self.ns("inet"), "link", "set", "wobr0", "up")
        for role in ("dns", "ca", "phone", "router", "relay", "laptop"):
            self._add_ns(role)
        for role in ("dns", "ca", "phone", "router", "relay"):
            self._wire_internet(role)
        # the home network: router lan0 <-> laptop eth0; the router masquerades it
        r, lap = self.ns("router"), self.ns("laptop")
        _run("ip", "-n", r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lap)
        _run("ip", "-n", r, "addr", "add", f"{ROUTER_LAN}/24", "dev", "lan0")
        _run("ip", "-n", r, "link", "set", "lan0", "up")
        _run("ip", "-n", lap, "addr", "add", f"{HOSTS['laptop'].address}/24", "dev", "eth0")
        _run("ip", "-n", lap, "link", "set", "eth0", "up")
        _run("ip", "-n", lap, "route", "add", "default", "via", ROUTER_LAN)
        _run("ip", "netns", "exec", r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", r, "nft", "add table ip wo_home; add chain ip wo_home post "
             "{ type nat hook postrouting priority srcnat; policy accept; }; "
             "add rule ip wo_home post oifname \"eth0\" masquerade")
        self._make_trust([])
        self._make_laptop_home()
        self._make_relay_etc()
        for role in ("dns", "ca", "phone", "router", "relay", "laptop"):
            self._make_mount_ns(role)
        self.start_dns()
        self.start_relay_sshd()
        self.start_pebble()

    def _make_trust(self, extra_pems: list[bytes]) -> None:
        base = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
        data = base + b"".join(extra_pems)
        if self.trust_bundle.exists():
            with open(self.trust_bundle, "r+b") as fh:  # in place: the bind mounts keep this inode
                fh.write(data)
                fh.truncate()
        else:
            self.trust_bundle.write_bytes(data)
            self.trust_bundle.chmod(0o644)

    def add_laptop(self, role: str, subnet: int) -> str:
        """Another laptop in a home network of its own (192.168.SUBNET.2 behind the same masquerading router, on
        its interface ``wl<SUBNET>``), with its own home and /usr/local/bin like the first. Returns its
        address. Stopped and deleted with the world."""
        address, gateway = f"192.168.{subnet}.2", f"192.168.{subnet}.1"
        self.extra_laptops[role] = address
        self._add_ns(role)
        r, lap = self.ns("router"), self.ns(role)
        lan = f"wol{subnet}"
        _run("ip", "-n", r, "link", "add", lan, "type", "veth", "peer", "name", "eth0", "netns", lap)
        _run("ip", "-n", r, "addr", "add", f"{gateway}/24", "dev", lan)
        _run("ip", "-n", r, "link", "set", lan, "up")
        _run("ip", "-n", lap, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", lap, "link", "set", "eth0", "up")
        _run("ip", "-n", lap, "route", "add", "default", "via", gateway)
        for d in (f"ulb-{role}/up", f"ulb-{role}/work"):
            (self.root / d).mkdir(parents=True)
        self._make_laptop_home(role)
        self._make_mount_ns(role)
        return address

    def rebuild_relay(self) -> None:
        """The relay reinstalled from the provider's image: every process gone, the ruleset and policy routing
        flushed, a fresh /etc (new host keys, no inverse-cloud state) and /root; sshd started again."""
        for name in ["relay-sshd", *(n for n in self.procs if n.startswith("relay-boot-"))]:
            self.stop(name, signal.SIGKILL)
        self._kill_relay_processes()
        self.run("relay", "nft", "flush", "ruleset", check=True)
        self._flush_relay_policy_routes()
        self._drop_mount_ns("relay")
        shutil.rmtree(self.relay_root)
        self._make_relay_etc()
        self._make_mount_ns("relay")
        self.start_relay_sshd()

    def _make_laptop_home(self, role: str = "laptop") -> None:
        home = self.home_of(role)
        home.mkdir(mode=0o700)
        pip_conf = Path.home() / ".config" / "pip" / "pip.conf"
        if pip_conf.is_file():
            (home / ".config" / "pip").mkdir(parents=True)
            shutil.copy(pip_conf, home / ".config" / "pip" / "pip.conf")

    # --- DNS --------------------------------------------------------------------------------------------

    def start_dns(self) -> None:
        d = self.root / "dns"
        for sub in ("zones", "run", "db"):
            (d / sub).mkdir(parents=True)
        self.knot_conf.write_text(
            f"server:\n    listen: [ {DNS_ADDR}@53, {DNS_ADDR6}@53 ]\n    rundir: {d / 'run'}\n    user: root:root\n"
            f"control:\n    listen: {d / 'knot.sock'}\n"
            "log:\n  - target: stderr\n    any: info\n"
            f"database:\n    storage: {d / 'db'}\n"
            f"template:\n  - id: default\n    storage: {d / 'zones'}\n    file: \"%s.zone\"\n"
            "    zonefile-sync: -1\n    journal-content: changes\n"
            f"zone:\n  - domain: {ZONE}\n  - domain: {CA_ZONE}\n")
        soa = f"@ SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 {TTL_S}\n@ NS ns.{ZONE}.\n"
        (d / "zones" / f"{ZONE}.zone").write_text(
            f"$ORIGIN {ZONE}.\n$TTL {TTL_S}\n{soa}ns A {DNS_ADDR}\n"
            # the relay's own name, as the VPS provider's DNS (or the user) has it before the journey
            f"relay A {HOSTS['relay'].address}\nrelay AAAA {HOSTS['relay'].address6}\n")
        (d / "zones" / f"{CA_ZONE}.zone").write_text(
            f"$ORIGIN {CA_ZONE}.\n$TTL {TTL_S}\n{soa}acme A {HOSTS['ca'].address}\n")
        self.popen("knot", "dns", "knotd", "-c", str(self.knot_conf))
        wait_until(lambda: self._alive("knot") and self.resolve("phone", RELAY_NAME) == [HOSTS["relay"].address],
                   20, "knot to answer", on_timeout=lambda: self.log("knot"))

    def add_phone6(self) -> str:
        """The IPv6-only phone (made once, on demand): on the internet bridge with only an IPv6 address, the
        world's DNS server by its IPv6 address in its resolv.conf, the same trust store as the phone. Returns
        its role name, for :meth:`prefix` and :meth:`run`."""
        if self.ns("phone6") in self.made_ns:
            return "phone6"
        (self.root / "resolv6.conf").write_text(f"nameserver {DNS_ADDR6}\n")
        self._add_ns("phone6")
        self._wire_internet("phone6")
        self._make_mount_ns("phone6")
        wait_until(lambda: self.run("phone6", "getent", "ahostsv6", RELAY_NAME, timeout=30).returncode == 0, 20,
                   "the IPv6-only phone resolving the relay's name")
        return "phone6"

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode if proc else 'never started'}):\n{self.log(name)}")
        return True

    def resolve(self, role: str, name: str) -> list[str]:
        """IPv4 addresses of ``name`` as ``role``'s system resolver answers (getent ahostsv4)."""
        out = self.run(role, "getent", "ahostsv4", name, timeout=30)
        return sorted({line.split()[0] for line in out.stdout.splitlines() if line.strip()})

    def _knotc(self, *args: str) -> None:
        _run("knotc", "-c", str(self.knot_conf), *args)

    def publish(self, lines: list[str]) -> list[str]:
        """Add zone-file lines (``name. TYPE rdata``, a ``;`` comment allowed) in one transaction, as a user
        does at their DNS provider. Returns the records added. Lines for other zones raise ValueError."""
        records = [_parse_record(line) for line in lines]
        self._knotc("zone-begin", ZONE)
        try:
            for owner, rtype, rdata in records:
                self._knotc("zone-set", ZONE, owner, str(TTL_S), rtype, *rdata)
        except BaseException:
            self._knotc("zone-abort", ZONE)
            raise
        self._knotc("zone-commit", ZONE)
        return [f"{o} {t} {' '.join(r)}" for o, t, r in records]

    def unpublish(self, owner: str, rtype: str, *, missing_ok: bool = False) -> None:
        """Remove every ``rtype`` record of ``owner`` (``missing_ok``: none there is fine, nothing changes)."""
        self._knotc("zone-begin", ZONE)
        try:
            self._knotc("zone-unset", ZONE, owner.rstrip(".") + ".", rtype)
        except RuntimeError:
            self._knotc("zone-abort", ZONE)
            if missing_ok:
                return
            raise
        self._knotc("zone-commit", ZONE)

    # --- the CA -----------------------------------------------------------------------------------------

    def start_pebble(self) -> None:
        d = self.root / "pebble"
        self.wfe_ca, wfe_cert, wfe_key = _pebble_certs(d)
        config = {"pebble": {
            "listenAddress": f"0.0.0.0:{PEBBLE_PORT}", "managementListenAddress": "127.0.0.1:15000",
            "certificate": str(wfe_cert), "privateKey": str(wfe_key), "httpPort": 80, "tlsPort": 443,
            "ocspResponderURL": "", "externalAccountBindingRequired": False, "certificateValidityPeriod": 3600}}
        (d / "pebble-config.json").write_text(json.dumps(config, indent=1))
        self.popen("pebble", "ca", "env", "PEBBLE_VA_NOSLEEP=1", "PEBBLE_AUTHZREUSE=0", "PEBBLE_WFE_NONCEREJECT=0",
                   "pebble", "-config", str(d / "pebble-config.json"), "-dnsserver", f"{DNS_ADDR}:53", "-strict=false")
        self.pebble_starts += 1
        wait_until(lambda: self._alive("pebble") and self.tcp_open("ca", "127.0.0.1", 15000)
                   and self.tcp_open("ca", "127.0.0.1", PEBBLE_PORT), 30, "pebble",
                   on_timeout=lambda: self.log("pebble"))
        self.trust_pebble()

    def pebble_roots(self) -> bytes:
        """Pebble's root and intermediate of this run (from its management port, inside the CA's namespace)."""
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.wfe_ca))
        ctx.check_hostname = False  # the management listener presents the acme.example.net certificate

        def fetch() -> bytes:
            out = b""
            for path in ("/roots/0", "/intermediates/0"):
                with urllib.request.urlopen(f"https://127.0.0.1:15000{path}", context=ctx, timeout=10) as r:
                    out += r.read()
            return out

        return self.call("ca", fetch)

    def trust_pebble(self, *, also: tuple[bytes, ...] = ()) -> None:
        """Devices trust the ACME server's HTTPS and the certificates Pebble issues (its roots change per run),
        and the CA certificates ``also`` (PEM): another public CA, whose certificates a site had before the
        journey. Called again without ``also``, those are trusted no more."""
        self._make_trust([self.wfe_ca.read_bytes(), self.pebble_roots(), *also])

    # --- the relay --------------------------------------------------------------------------------------

    def _make_relay_etc(self) -> None:
        self.relay_root.mkdir()
        (self.relay_root / "root").mkdir(mode=0o700)
        for own in ("var-www", "var-log-nginx"):       # the VPS's web roots and nginx logs, not this machine's
            (self.relay_root / own).mkdir(mode=0o755)
        _run("cp", "-a", "/etc", str(self.relay_etc))
        ssh = self.relay_etc / "ssh"
        for old in [*ssh.glob("ssh_host_*"), *(ssh / "sshd_config.d").glob("*.conf")]:
            old.unlink()
        (ssh / "sshd_config").write_text(DEBIAN_SSHD_CONFIG)
        (self.relay_etc / "resolv.conf").unlink(missing_ok=True)
        (self.relay_etc / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\n")
        (self.relay_etc / "hostname").write_text("relay\n")
        (self.relay_etc / "hosts").write_text(DEBIAN_HOSTS)
        for pattern in ("*.wants/inverse-cloud-*", *(f"*.wants/{unit}" for units in RELAY_PACKAGES.values()
                                                        for unit in units[1])):
            for wants in (self.relay_etc / "systemd" / "system").glob(pattern):
                wants.unlink()
        for files, _ in RELAY_PACKAGES.values():
            for rel in files:
                (self.relay_etc / rel).unlink(missing_ok=True)
        (self.relay_etc / "sslh.cfg").unlink(missing_ok=True)
        shutil.rmtree(self.relay_etc / "inverse-cloud", ignore_errors=True)
        (self.relay_etc / "sysctl.d" / "60-inverse-cloud.conf").unlink(missing_ok=True)
        self.new_relay_host_keys()

    def relay_apt_install(self, package: str) -> None:
        """``apt install PACKAGE`` on the relay (one of :data:`RELAY_PACKAGES`): its files under /etc (from this
        machine's, where the package is installed) and its units enabled, as Debian's postinst does. Nothing is
        started: the package's /etc/default/sslh listens on ``<change-me>:443``, no address, until configured."""
        files, units = RELAY_PACKAGES[package]
        for rel in files:
            shutil.copy2(Path("/etc") / rel, self.relay_etc / rel)
        for unit in units:
            wants = self.relay_etc / "systemd" / "system" / "multi-user.target.wants"
            wants.mkdir(parents=True, exist_ok=True)
            (wants / unit).unlink(missing_ok=True)
            (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")

    def new_relay_host_keys(self) -> None:
        """The relay rebuilt: fresh host keys (takes effect at the next sshd start)."""
        for old in (self.relay_etc / "ssh").glob("ssh_host_*"):
            old.unlink()
        _run("ssh-keygen", "-A", "-f", str(self.relay_root))

    def relay_fingerprint(self, key_type: str = "ed25519") -> str:
        out = _run("ssh-keygen", "-lf", str(self.relay_etc / "ssh" / f"ssh_host_{key_type}_key.pub"))
        return out.stdout.split()[1]

    def authorize_admin(self, pubkey: str, *, also: bool = False) -> None:
        """The VPS provider installs the admin's key for root (``also``: one more key, the others kept)."""
        dot_ssh = self.relay_root / "root" / ".ssh"
        dot_ssh.mkdir(mode=0o700, exist_ok=True)
        keys = dot_ssh / "authorized_keys"
        before = keys.read_text() if also and keys.exists() else ""
        keys.write_text(before + pubkey.strip() + "\n")
        (dot_ssh / "authorized_keys").chmod(0o600)

    def start_relay_sshd(self) -> None:
        self.popen("relay-sshd", "relay", "/usr/sbin/sshd", "-D", "-E", str(self.root / "relay-sshd.log"))
        wait_until(lambda: self._alive("relay-sshd") and self.tcp_open("phone", HOSTS["relay"].address, 22), 20,
                   "the relay's sshd", on_timeout=lambda: self.log("relay-sshd"))

    def stop_relay_sshd(self) -> None:
        """``systemctl stop ssh``: the listener goes; established sessions (the tunnel) are cut as well."""
        self.stop("relay-sshd")
        self._kill_relay_processes()

    def _relay_pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.ns("relay"), check=False)
        return [int(p) for p in out.stdout.split()]

    def _kill_relay_processes(self) -> None:
        for pid in self._relay_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self._relay_pids(), 15, "the relay's processes to end")

    def relay_nat(self) -> str:
        return self.run("relay", "nft", "list", "table", "ip", "inverse_cloud").stdout

    def flush_relay_nat(self) -> None:
        self.run("relay", "nft", "flush", "ruleset", check=True)

    def reboot_relay(self) -> None:
        """Power off, then boot from the relay's /etc. Off: every process in the relay's namespace is killed, its
        ruleset and policy routing flushed, and every sysctl boot may set (and route_localnet, ip_forward) back to
        the value of a fresh network namespace; a new mount namespace (an empty /run). On: what relay_boot says boot
        runs (the sysctls and NAT units, then the enabled sslh/nginx, each remembered as ``relay-boot-<unit>`` when
        it runs in the foreground; a forking one's daemon is in the namespace like the rest), then sshd."""
        for name in ["relay-sshd", *(n for n in self.procs if n.startswith("relay-boot-"))]:
            self.stop(name, signal.SIGKILL)
        self._kill_relay_processes()
        self.run("relay", "nft", "flush", "ruleset", check=True)
        self._flush_relay_policy_routes()
        for table in ("nat", "filter", "mangle"):
            self.run("relay", "iptables-legacy" if shutil.which("iptables-legacy") else "iptables", "-t", table, "-F")
        keys = {k for k, _ in sysctl_settings(self.relay_etc) if k.startswith("net.")}
        keys |= {"net.ipv4.conf.all.route_localnet", "net.ipv4.ip_forward"}
        for key in sorted(keys):
            pristine = _run("unshare", "-n", "sysctl", "-n", key, check=False).stdout.strip()
            if pristine:
                self.run("relay", "sysctl", "-q", "-w", f"{key}={pristine}")
        self._drop_mount_ns("relay")
        self._make_mount_ns("relay")
        script = "set -e\n" + "".join(" ".join(shlex.quote(a) for a in cmd) + "\n"
                                      for cmd in boot_commands(self.relay_etc))
        self.run("relay", "sh", "-c", script, check=True)
        for service in boot_services(self.relay_etc):
            if service.forking:       # returns once the daemon runs; the daemon is killed with the relay
                self.run("relay", *service.argv, check=True)
            else:
                self.popen(f"relay-boot-{service.name}", "relay", *service.argv)
        self.start_relay_sshd()

    def _flush_relay_policy_routes(self) -> None:
        """The relay's policy routing back at a fresh boot's, for both families: only the kernel's rules (local,
        main, default) and tables (what the NAT unit adds, ``ip rule`` and routes in a table of its own, is gone
        at power-off like the ruleset)."""
        for family in ("-4", "-6"):
            rules = json.loads(self.run("relay", "ip", "-j", family, "rule", "show", check=True).stdout or "[]")
            for rule in rules:
                if rule.get("priority") not in (0, 32766, 32767):
                    self.run("relay", "ip", family, "rule", "del", "priority", str(rule["priority"]), check=True)
            routes = json.loads(self.run("relay", "ip", "-j", family, "route", "show", "table", "all",
                                         check=True).stdout or "[]")
            for table in sorted({str(r["table"]) for r in routes if "table" in r} - {"main", "local", "default"}):
                self.run("relay", "ip", family, "route", "flush", "table", table, check=True)

    # --- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name)
        with contextlib.suppress(Exception):
            self._kill_relay_processes()
        for role in ("laptop", *self.extra_laptops, "phone", "phone6", "ca", "dns", "router"):
            if self.ns(role) in self.made_ns:
                for pid in _run("ip", "netns", "pids", self.ns(role), check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for name in reversed(self.made_ns):
            _run("ip", "netns", "delete", name, check=False)
        self.made_ns.clear()
        for role in ("inet", *HOSTS, *self.extra_laptops):
            self._drop_mount_ns(role)
        if self.ns_mounted:
            _run("umount", str(self.root / "ns"), check=False)
            self.ns_mounted = False


def _parse_record(line: str) -> tuple[str, str, list[str]]:
    """``"contacts.example.org. CAA 0 issue \\"a; b\\"   ; comment"`` -> (owner, "CAA", ["0", "issue", '"a; b"'])."""
    words: list[str] = []
    cur, quoted = "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == ";" and not quoted:
            break
        elif ch.isspace() and not quoted:
            if cur:
                words.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        words.append(cur)
    if len(words) < 3:
        raise ValueError(f"not a DNS record line: {line!r}")
    owner, rtype, rdata = words[0], words[1].upper(), words[2:]
    if not (owner.rstrip(".") == ZONE or owner.rstrip(".").endswith("." + ZONE)):
        raise ValueError(f"{owner} is not in the world's zone {ZONE}")
    if rtype in ("A", "AAAA"):
        ipaddress.ip_address(rdata[0])
    return owner if owner.endswith(".") else owner + ".", rtype, rdata


@contextlib.contextmanager
def world_session() -> Iterator[World]:
    """Build the world (about ten seconds), yield it, tear it down (also on failure)."""
    root = Path(tempfile.mkdtemp(prefix="wo-world-"))
    world = World(root=root)
    try:
        world.build()
        yield world
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)
