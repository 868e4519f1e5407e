"""benchmarks/trl_overhead.py (R2M's per-step cost against TRL's own GRPOTrainer): the pairing
arithmetic, and one pair of tiny runs end to end (the numbers themselves are the lead's, from a
quiet machine)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tests.support.trl_tiny import save_tiny_models  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trl_overhead.py"


def load_script():
    spec = importlib.util.spec_from_file_location("trl_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_are_compared_arm_to_arm_whatever_their_order():
    overhead = load_script()

    def run(arm, steps, extra=0.0):
        return {"arm": arm, "step_s": steps, "peak_mib": 100.0 if arm == "plain" else 103.0,
                "extra_forward_s": extra, "head_update_s": extra / 2}

    runs = [run("plain", [1.0, 1.0, 5.0]), run("r2m", [1.2, 1.3, 1.2], 0.8),  # pair 1: plain first
            run("r2m", [3.0, 3.0, 0.1], 0.4), run("plain", [2.0, 2.0, 2.0])]  # pair 2: r2m first
    summary = overhead.summarise(runs, steps=4)
    assert summary["ratios"] == pytest.approx([1.2, 1.5])
    assert (summary["ratio_median"], summary["ratio_min"], summary["ratio_max"]) == pytest.approx((1.35, 1.2, 1.5))
    assert summary["step_s"] == pytest.approx({"plain": 1.5, "r2m": 2.1})
    assert summary["peak_mib"] == {"plain": 100.0, "r2m": 103.0}
    assert summary["extra_forward_s_per_step"] == pytest.approx(0.6 / 4)
    assert summary["head_update_s_per_step"] == pytest.approx(0.3 / 4)
    with pytest.raises(SystemExit):
        overhead.parse_args(["--policy", "p", "--steps", "3", "--num_iterations", "2"])


@pytest.mark.slow
def test_one_pair_of_tiny_runs(tmp_path):
    models = save_tiny_models(tmp_path / "models")
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, str(SCRIPT), "--policy", str(models / "policy"), "--reward_model", str(models / "rm"),
           "--pairs", "1", "--steps", "3", "--max_completion_length", "4", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "R2M / plain TRL GRPO, per optimizer step" in done.stdout
    result = json.loads(out.read_text())
    plain, r2m = result["runs"]
    assert (plain["arm"], r2m["arm"]) == ("plain", "r2m")
    assert len(plain["step_s"]) == len(r2m["step_s"]) == 2
    assert plain["extra_forwards"] == 0 and r2m["extra_forwards"] == 3  # GRPO's defaults: no pi_old pass
    assert r2m["extra_forward_s"] > 0 and r2m["head_update_s"] > 0 and plain["head_update_s"] == 0
    summary = result["summary"]
    assert all(math.isfinite(summary[k]) and summary[k] > 0 for k in ("ratio_median", "ratio_min", "ratio_max"))
    assert summary["peak_mib"]["plain"] > 0 and summary["peak_mib"]["r2m"] > 0
