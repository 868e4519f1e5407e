#!/usr/bin/env bash
# Set up and run the tests: create (or reuse) .venv, install r2m with its test extras, create
# (or reuse) the environment with the oldest supported Triton for the GPU compile check, run
# pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install --quiet -e ".[test]"
R2M_OLDEST_TRITON_PYTHON="$(bash scripts/oldest_triton_venv.sh)"
export R2M_OLDEST_TRITON_PYTHON
exec python -m pytest "$@"
