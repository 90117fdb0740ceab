#!/usr/bin/env bash
# Mutation testing with mutmut, one module at a time, each against the fast-suite tests written for it (the
# table below). mutmut changes one operator, constant or call at a time and runs those tests; a mutant no test
# notices "survived". Prints killed/survived counts, the score per module, and every survivor's diff.
# Slow (minutes per module on two cores): NOT part of .ci/run.
#
#   scripts/mutate.sh                                   every module in the table
#   scripts/mutate.sh inverse_cloud/certs/policy.py     only these
#   JOBS=4 scripts/mutate.sh                            parallel workers (default: 2)
#   RECHECK=old-report.txt scripts/mutate.sh MODULE     run only the survivors listed in an earlier report
#                                                       (after adding tests; the module must be unchanged)
#
# Each module runs in a scratch copy of the checkout (mutmut rewrites the sources it runs under mutants/),
# with [tool.mutmut] narrowed to that module and its tests; the report is also written to
# mutants-report.txt (or $REPORT). Tests that run the code in a child process (ServeProcess, the CLI) cannot kill a mutant:
# mutmut only sees calls made in its own process, so a score is a lower bound.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
MUTMUT="$(dirname "$PY")/mutmut"
[ -x "$MUTMUT" ] || { echo "mutmut is not installed next to $PY: pip install -e '.[test]'" >&2; exit 2; }

# module -> the fast-suite test files that exercise it
declare -A TESTS=(
  # decisions
  [inverse_cloud/certs/policy.py]="tests/test_certs.py tests/test_cert_manager.py"
  [inverse_cloud/tunnel/relay_files.py]="tests/test_relay.py"
  [inverse_cloud/tunnel/relay_front.py]="tests/test_relay.py tests/test_relay_sni.py"
  [inverse_cloud/tunnel/relay_sni.py]="tests/test_relay_sni.py tests/test_relay.py"
  [inverse_cloud/tunnel/relay_nat6.py]="tests/test_relay.py"
  [inverse_cloud/tunnel/relay_divert.py]="tests/test_relay.py"
  [inverse_cloud/config.py]="tests/test_config.py"
  [inverse_cloud/tunnel/policy.py]="tests/test_tunnel.py tests/test_netwatch.py"
  # control paths (the tunnel's retry_delay/classify are decisions inside link.py)
  [inverse_cloud/tunnel/link.py]="tests/test_tunnel.py tests/test_watcher.py"
  [inverse_cloud/tunnel/handoff.py]="tests/test_tunnel.py tests/test_descriptors.py tests/test_handoff.py"
  [inverse_cloud/dav/listeners.py]="tests/test_listeners.py tests/test_server.py"
  [inverse_cloud/dav/wsgi.py]="tests/test_web.py tests/test_server.py tests/test_bridge.py tests/test_bridge_upkeep.py tests/test_wsgi_memory.py"
  [inverse_cloud/dav/throttle.py]="tests/test_throttle.py tests/test_bridge.py"
  [inverse_cloud/dav/environ.py]="tests/test_environ.py tests/test_web.py tests/test_bridge.py"
  [inverse_cloud/ops/backup.py]="tests/test_backup.py tests/test_backup_paths.py"
  [inverse_cloud/ops/backup_crypt.py]="tests/test_backup_crypt.py tests/test_backup.py"
  [inverse_cloud/ops/backup_review.py]="tests/test_backup_review.py tests/test_backup.py"
)
ORDER=(inverse_cloud/certs/policy.py inverse_cloud/tunnel/relay_files.py inverse_cloud/tunnel/relay_front.py
       inverse_cloud/tunnel/relay_sni.py inverse_cloud/tunnel/relay_nat6.py inverse_cloud/tunnel/relay_divert.py
       inverse_cloud/config.py
       inverse_cloud/tunnel/policy.py inverse_cloud/tunnel/link.py inverse_cloud/tunnel/handoff.py
       inverse_cloud/dav/listeners.py
       inverse_cloud/dav/wsgi.py inverse_cloud/dav/throttle.py inverse_cloud/dav/environ.py
       inverse_cloud/ops/backup.py inverse_cloud/ops/backup_crypt.py inverse_cloud/ops/backup_review.py)
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${ORDER[@]}")
for m in "${modules[@]}"; do
  [ -n "${TESTS[$m]:-}" ] || { echo "$m: not in the table in $0 (add it with its test files)" >&2; exit 2; }
done

SCRATCH="$(mktemp -d /tmp/inverse-cloud-mutate.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
REPORT="${REPORT:-mutants-report.txt}"
: > "$REPORT"
for m in "${modules[@]}"; do
  work="$SCRATCH/$(echo "$m" | tr / _)"
  mkdir -p "$work"
  tar --exclude=./mutants --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C "$work"
  # shellcheck disable=SC2086
  "$PY" - "$work/pyproject.toml" "$m" ${TESTS[$m]} <<'PY'
import re, sys
path, module, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path).read()
section = ('[tool.mutmut]\nsource_paths = ["inverse_cloud"]\nonly_mutate = ["%s"]\n'
           'also_copy = ["config.example.toml", "tests/golden"]\n'
           'pytest_add_cli_args_test_selection = [%s]\n'
           'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
           % (module, ", ".join(f'"{t}"' for t in tests)))
text = re.sub(r"\[tool\.mutmut\].*?(?=\n\[|\Z)", section, text, flags=re.S)
open(path, "w").write(text)
PY
  echo "== $m (tests: ${TESTS[$m]})" >&2
  # `inverse-cloud` children of some tests must import the scratch copy, never an installed package.
  names=()
  if [ -n "${RECHECK:-}" ]; then
    dotted="$(echo "${m%.py}" | tr / .)"
    mapfile -t names < <(grep -oE "^${dotted//./\\.}\.[^ ]*__mutmut_[0-9]+" "$RECHECK")
    [ ${#names[@]} -gt 0 ] || { echo "$RECHECK lists no survivor of $m" >&2; exit 2; }
    echo "   re-checking ${#names[@]} survivor(s) of $RECHECK" >&2
  fi
  if ! (cd "$work" && PYTHONPATH="$work" "$MUTMUT" run --max-children "${JOBS:-2}" "${names[@]}" > run.log 2>&1); then
    tr '\r' '\n' < "$work/run.log" | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' | tail -40 >&2
    exit 1
  fi
  previous=()
  [ -z "${RECHECK:-}" ] || previous=(--previous "$(realpath "$RECHECK")")
  (cd "$work" && PYTHONPATH="$work" "$PY" "$REPO/scripts/mutation_report.py" "${previous[@]}" "$m") | tee -a "$REPORT"
done
echo "report: $REPORT" >&2
