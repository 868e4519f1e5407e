#!/usr/bin/env bash
# Set up and run the tests: create (or reuse) .venv, install r2m with its test extras, run
# pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install --quiet -e ".[test]"
exec python -m pytest "$@"
