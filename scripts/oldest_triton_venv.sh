#!/usr/bin/env bash
# Create (or reuse) the environment with the oldest Triton r2m supports (the lower bound of
# `triton` in pyproject.toml; the GPU machine's version), for the ahead-of-time compile check
# (tests/kernels/test_triton_compile.py), and print its python. torch is the CPU build on this disk;
# numpy < 2.4 because triton 3.6's interpreter breaks on numpy 2.4. r2m itself is not
# installed there: the check runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_OLDEST=3.6.0
venv="${R2M_OLDEST_TRITON_VENV:-.venv-triton-$TRITON_OLDEST}"
if ! "$venv/bin/python" -c "import triton, torch; assert triton.__version__ == '$TRITON_OLDEST'" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" "triton==$TRITON_OLDEST" "numpy<2.4" >&2
fi
echo "$PWD/$venv/bin/python"
