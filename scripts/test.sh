#!/usr/bin/env bash
# Sets up and runs every test on a fresh Debian 12 (Python 3.11+): system packages the tests start
# (sshd, pebble, vdirsyncer, nginx for the baseline, a DNS server for the test world,
# sslh for SSH on 443), a venv with the
# package, then lint, types, tests. Safe on a developer's machine: installing the packages starts and enables
# no service, and the users the tests create are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=(python3-venv openssh-server openssh-client pebble vdirsyncer curl nftables iptables faketime socat nginx autossh
      systemd chromium zbar-tools iproute2 procps openssl util-linux libnginx-mod-stream
      sslh knot pdns-server pdns-backend-sqlite3 systemd-container)  # sslh: SSH on 443 (integration/test_ssh_on_443.py); knot: the test world's authoritative DNS server (integration/world.py); PowerDNS with its HTTP API: setup --dns powerdns (integration/test_setup_journey.py); systemd-container: systemd-nspawn boots a container with a real systemd for the user unit (integration/test_systemd_user.py)
# accounts the tests create on this machine (integration/relay_sshd.py's tunnel user); removed at the end
test_users=(ictunnel)
users_before=()
for u in "${test_users[@]}"; do id -u "$u" >/dev/null 2>&1 && users_before+=("$u"); done
POLICY=/usr/sbin/policy-rc.d
cleanup() {
  for u in "${test_users[@]}"; do
    case " ${users_before[*]:-} " in *" $u "*) continue ;; esac
    if id -u "$u" >/dev/null 2>&1; then
      $SUDO userdel "$u" 2>/dev/null || true
      $SUDO groupdel "$u" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  # policy-rc.d exiting 101 ("action forbidden") keeps invoke-rc.d and deb-systemd-invoke from starting
  # sshd on :22 and nginx on :80 while their packages install; a policy-rc.d of the machine's own is kept.
  own_policy=""
  if [ -e "$POLICY" ]; then own_policy=yes; else
    printf '#!/bin/sh\n# scripts/test.sh: no service starts while test packages install\nexit 101\n' \
      | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
  fi
  # the units the packages enable (postinst symlinks) are disabled again afterwards
  wants_before=$(ls -1 /etc/systemd/system/*.wants/ 2>/dev/null | sort -u || true)
  set +e
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  rc=$?
  set -e
  [ -n "$own_policy" ] || $SUDO rm -f "$POLICY"
  wants_after=$(ls -1 /etc/systemd/system/*.wants/ 2>/dev/null | sort -u || true)
  for unit in $(comm -13 <(printf '%s\n' "$wants_before") <(printf '%s\n' "$wants_after") | grep -E '\.(service|socket|timer)$' || true); do
    $SUDO systemctl disable --quiet "$unit" 2>/dev/null || true
  done
  [ "$rc" = 0 ] || exit "$rc"
fi
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# The tested set, every file checked against its hash (requirements.lock, made by pip-compile); then the
# package itself without resolving anything again.
"$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes -r requirements.lock
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
