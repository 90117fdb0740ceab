#!/usr/bin/env bash
# Mutation testing with mutmut over the modules listed in pyproject.toml ([tool.mutmut] only_mutate), against
# the fast suite (tests/): each mutant runs the tests that reach the mutated function. Prints the score per
# module and every surviving mutant with its diff. Slow (minutes per module on two cores): NOT part of .ci/run.
#
#   scripts/mutate.sh                                   every listed module
#   scripts/mutate.sh inverse_cloud/certs/policy.py     only these (they must be listed in only_mutate)
#   JOBS=4 scripts/mutate.sh                            parallel workers (default: 2)
#
# Starts from a fresh mutants/ folder every time (mutmut keeps results of files it saw unmutated before,
# and of tests that have changed since). The report is also written to mutants/report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
MUTMUT="$(dirname "$PY")/mutmut"
[ -x "$MUTMUT" ] || { echo "mutmut is not installed in $(dirname "$PY"): pip install -e '.[test]'" >&2; exit 2; }
names=()
for module in "$@"; do
  grep -q "\"$module\"" pyproject.toml || { echo "$module is not in [tool.mutmut] only_mutate" >&2; exit 2; }
  dotted="${module%.py}"; dotted="${dotted//\//.}"
  names+=("$dotted.*")
done
rm -rf mutants && mkdir mutants
# The console script and `python -m inverse_cloud.cli` children of some tests must import this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$MUTMUT" run --max-children "${JOBS:-2}" "${names[@]}" > mutants/run.log 2>&1 || {
  tr '\r' '\n' < mutants/run.log | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' | tail -40 >&2; exit 1; }
"$PY" scripts/mutation_report.py "$@" | tee mutants/report.txt
