"""tests.support.kernel_cases as pytest tests: every case on its own backend on the GPU, and
the cases themselves (inputs, gradients, comparisons) on the CPU with the torch backend
standing in. scripts/gpu_check.sh runs the same table as a program under compute-sanitizer."""

from __future__ import annotations

import fnmatch

import pytest
import torch

from tests.support import kernel_cases as kc

CASES = kc.all_cases()
# The small cases of every op and layout (the wide cuda ones only repeat their construction).
CPU_PATTERNS = ("*pool*-D203-*", "*pool*-D256-*", "*grebt*", "*score_mix*")
CPU_CASES = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, p) for p in CPU_PATTERNS)]


def _check(case, backend, device):
    ok, errors = kc.check_outputs(case.run(backend, device), case.tolerance)
    assert ok, f"{case.name} on {backend}: relative errors {errors}, tolerance {case.tolerance}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_case_on_the_gpu(case):
    _check(case, case.backend, torch.device("cuda"))


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_kernel_case_on_the_cpu_with_torch(case):
    _check(case, "torch", torch.device("cpu"))


def test_kernel_cases_cover_every_kernel():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for fragment in ("triton-pool-bf16-mask-direct-D203-h1-dq", "triton-pool-bf16-packed-split-D203-h16-dq+dh",
                     "triton-grebt-fp32-ragged", "triton-score_mix", "cuda-pool-bf16-mask-split-D12291-h1-dq+dh",
                     "cuda-pool-bf16-packed-direct-D4096-h1-dq", "cuda-grebt-fp32-uniform"):
        assert any(n.startswith(fragment) for n in names), fragment


def test_the_program_runs_a_selection_on_the_cpu(capsys):
    assert kc.main(["--device", "cpu", "--substitute-backend", "torch", "--match", "*score_mix*"]) == 0
    assert "2 of 2 cases match the float64 torch reference" in capsys.readouterr().out
    assert kc.main(["--list", "--match", "nothing-matches"]) == 1


def test_case_comparison_fails_on_wrong_or_missing_values():
    want = torch.randn(3, 5, dtype=torch.float64)
    assert kc.check_outputs({"x": (want.float(), want)}, 1e-6)[0]
    wrong = want.clone()
    wrong[1, 2] += 1.0
    assert not kc.check_outputs({"x": (wrong, want)}, 1e-2)[0]
    poisoned = want.clone()
    poisoned[0, 0] = float("nan")
    assert not kc.check_outputs({"x": (poisoned, want)}, 1e-2)[0]
    assert not kc.check_outputs({"x": (want[:2], want)}, 1e-2)[0]
