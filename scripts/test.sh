#!/usr/bin/env bash
# Sets up and runs every test on a fresh Debian 12 (Python 3.11+): system packages the tests start
# (sshd, pebble, vdirsyncer, nginx for the baseline, sslh for SSH on 443), a venv with the package, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=(openssh-server openssh-client pebble vdirsyncer curl nftables iptables faketime socat nginx autossh systemd chromium zbar-tools iproute2 procps openssl util-linux libnginx-mod-stream sslh)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  # policy-rc.d: installing openssh-server/nginx must not start the system-wide services.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
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
