# Sourced by test.sh and demo.sh: create (or reuse) the virtual environment in .venv (or
# $R2M_VENV), activate it, and make sure torch is there. The venv sees the system's
# site-packages, so a machine that already has torch (a GPU box) keeps it; where there is
# none, torch==2.13.0 is the CPU build (a bare `torch` would pull a multi-GB CUDA build).
venv="${R2M_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
. "$venv/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
