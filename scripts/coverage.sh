#!/usr/bin/env bash
# Branch coverage of the fast suite (tests/) over inverse_cloud/, with the lines and branches not taken.
# Only this process is measured: code that tests run in an `inverse-cloud` child process counts as not covered.
#
#   scripts/coverage.sh                         the whole package
#   scripts/coverage.sh --cov-report=html       also writes htmlcov/
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3)}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" -m pytest -p no:cacheprovider -q --cov=inverse_cloud --cov-branch \
  --cov-report=term-missing:skip-covered "$@" tests
