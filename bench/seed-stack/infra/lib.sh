# shellcheck shell=bash
# Common settings and helpers for the seed-stack bench scripts.
# Every value can be overridden from the environment.
set -euo pipefail

BENCH_DIR="${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# The repo's venv (bench/seed-stack/../../.venv), as scripts/test.sh makes it.
VENV="${VENV:-$(cd "$BENCH_DIR/../.." && pwd)/.venv}"
PY="${PY:-$VENV/bin/python}"
# All runtime state (keys, configs, storage, logs, pid files) lives here.
BENCH_STATE="${BENCH_STATE:-/tmp/icbench}"

HOST_NAME="${HOST_NAME:-laptop.test}"          # the public name the phone uses
RELAY_ADDR="${RELAY_ADDR:-127.0.0.1}"          # where the relay's sshd listens
RELAY_SSH_PORT="${RELAY_SSH_PORT:-2222}"       # relay sshd port
RELAY_CONNECT_PORT="${RELAY_CONNECT_PORT:-$RELAY_SSH_PORT}"  # where autossh connects (a fault proxy may sit between)
RELAY_HTTPS_PORT="${RELAY_HTTPS_PORT:-44353}"  # relay side of -R for TLS (NAT 443 -> this)
RELAY_HTTP_PORT="${RELAY_HTTP_PORT:-8053}"     # relay side of -R for HTTP (NAT 80 -> this)
RELAY_USER="${RELAY_USER:-$(id -un)}"          # account the tunnel logs in as (see relay-sshd.sh)
NGINX_HTTP_PORT="${NGINX_HTTP_PORT:-8080}"
NGINX_HTTPS_PORT="${NGINX_HTTPS_PORT:-8443}"
RADICALE_PORT="${RADICALE_PORT:-35232}"
RADICALE_USER="${RADICALE_USER:-bench}"
RADICALE_PASSWORD="${RADICALE_PASSWORD:-bench-password}"
BCRYPT_ROUNDS="${BCRYPT_ROUNDS:-5}"            # 5 = `htpasswd -B` default
PEBBLE_PORT="${PEBBLE_PORT:-14000}"
PEBBLE_MGMT_PORT="${PEBBLE_MGMT_PORT:-15000}"
CHALLTEST_DNS_PORT="${CHALLTEST_DNS_PORT:-8553}"
CHALLTEST_MGMT_PORT="${CHALLTEST_MGMT_PORT:-8055}"
SERVER_ALIVE_INTERVAL="${SERVER_ALIVE_INTERVAL:-30}"   # blog: ssh -o ServerAliveInterval=30
CLIENT_ALIVE_INTERVAL="${CLIENT_ALIVE_INTERVAL:-15}"   # blog: sshd ClientAliveInterval 15
RELAY_FORCE_COMMAND="${RELAY_FORCE_COMMAND-/usr/sbin/nologin}"  # set to "" for the key line alone
EXTRA_SSH_OPTS="${EXTRA_SSH_OPTS:-}"                   # e.g. "-o ExitOnForwardFailure=yes" (not in the blog)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now_ms() { date +%s%3N; }

ensure_state() {
  mkdir -p "$BENCH_STATE"
  # nginx workers (www-data when started as root) must traverse into the state dir
  chmod 755 "$BENCH_STATE"
}

# wait_tcp HOST PORT TIMEOUT_S -- poll until a TCP connect succeeds
wait_tcp() {
  local host=$1 port=$2 timeout=${3:-10} start
  start=$(now_ms)
  while (( $(now_ms) - start < timeout * 1000 )); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# wait_file PATH TIMEOUT_S -- poll until a file exists and is non-empty
wait_file() {
  local f=$1 timeout=${2:-10} start
  start=$(now_ms)
  while (( $(now_ms) - start < timeout * 1000 )); do
    [[ -s $f ]] && return 0
    sleep 0.05
  done
  return 1
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# stop_pidfile FILE NAME -- TERM the pid in FILE, wait up to 5 s, then KILL
stop_pidfile() {
  local f=$1 name=$2 pid i
  [[ -f $f ]] || { log "$name: not running (no $f)"; return 0; }
  pid=$(cat "$f")
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.05; done
    if pid_alive "$pid"; then log "$name: pid $pid ignored TERM, sending KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    log "$name: stopped pid $pid"
  else
    log "$name: pid $pid already gone"
  fi
  rm -f "$f"
}

# phone_get URL_PATH -- one HTTPS request as the phone would make it (name laptop.test forced to
# 127.0.0.1 with curl --resolve, pebble's root as the only trust anchor). Prints the HTTP status.
phone_get() {
  local port=${PHONE_PORT:-$RELAY_HTTPS_PORT} path=${1:-/radicale/}
  curl -s -o /dev/null -w '%{http_code}' --max-time "${PHONE_TIMEOUT:-3}" \
    --resolve "$HOST_NAME:$port:127.0.0.1" --cacert "$BENCH_STATE/pebble/root.pem" \
    -u "$RADICALE_USER:$RADICALE_PASSWORD" "https://$HOST_NAME:$port$path" || true
}

# wait_phone TIMEOUT_S -- poll phone_get until Radicale answers (2xx/3xx) through the chain
wait_phone() {
  local timeout=${1:-30} start code
  start=$(now_ms)
  while (( $(now_ms) - start < timeout * 1000 )); do
    code=$(phone_get /radicale/)
    [[ $code =~ ^[23] ]] && return 0
    sleep 0.05
  done
  return 1
}
