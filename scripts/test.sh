#!/usr/bin/env bash
# Set up and run the tests: create (or reuse) a virtual environment in .venv, install r2m
# with its test extras, run pytest. Extra arguments go to pytest.
# The venv sees the system's site-packages, so a machine that already has torch (a GPU box)
# keeps it; where there is none, torch==2.13.0 is the CPU build (a bare `torch` would pull a
# multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${R2M_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
. "$venv/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
exec python -m pytest "$@"
