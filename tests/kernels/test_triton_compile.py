"""Every Triton kernel compiles for the GPU (sm_90 and sm_80), ahead of time and without one,
under each supported Triton: the oldest (the GPU machine's) and the installed newest
(docs/design.md §5, §9). tests/support/triton_compile.py does the work in a subprocess, since it needs
TRITON_INTERPRET off and this session has it on without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLDEST_PYTHON = os.environ.get("R2M_OLDEST_TRITON_PYTHON")

pytestmark = pytest.mark.slow


def oldest_supported_triton() -> str:
    """The lower bound of `triton` in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"triton>=([0-9.]+)', text).group(1)


def run_compile_check(python: str, report: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    done = subprocess.run([python, "-m", "tests.support.triton_compile", "--report", str(report)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    # The summary (registers and spills per kernel) shows with pytest -s or on failure.
    print(done.stdout)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return json.loads(report.read_text())


def check_report(report: dict) -> None:
    rows = report["specialisations"]
    assert rows and not [r for r in rows if "error" in r]
    for arch in (90, 80):
        assert {r["kernel"] for r in rows if r["arch"] == arch} >= {
            "_pool_fwd_kernel", "_pool_bwd_kernel", "_scores_kernel", "_weighted_rows_kernel",
            "_dscores_kernel", "_grebt_fwd_kernel", "_score_mix_fwd_kernel", "_score_mix_bwd_kernel"}


def test_compiles_under_the_installed_triton(tmp_path):
    check_report(run_compile_check(sys.executable, tmp_path / "report.json"))


@pytest.mark.skipif(OLDEST_PYTHON is None, reason="R2M_OLDEST_TRITON_PYTHON is not set: scripts/test.sh "
                                                  "creates that environment (scripts/oldest_triton_venv.sh)")
def test_compiles_under_the_oldest_supported_triton(tmp_path):
    report = run_compile_check(OLDEST_PYTHON, tmp_path / "report.json")
    assert report["triton"] == oldest_supported_triton()
    check_report(report)


def test_the_oldest_environment_is_the_supported_lower_bound():
    script = (ROOT / "scripts" / "oldest_triton_venv.sh").read_text()
    assert f"TRITON_OLDEST={oldest_supported_triton()}" in script
