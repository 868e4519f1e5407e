"""scripts/gpu_check.sh and tests.support.gpu_check, on the CPU: the dry run passes and lists
every stage, the real run's bookkeeping writes a summary for a failing stage, and the checks
that decide pass/fail can fail. (The kernel cases are checked in tests/kernels/test_kernel_cases.py,
the SASS parse in tests/kernels/test_sass.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["build", "pytest-gpu", "bench-pool", "bench-head", "bench-grebt", "bench-update",
          "kernel-cases", "memcheck", "racecheck", "sass", "bench-pool-variants"]


from tests.support import gpu_check as tools


def _run(*args, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args, "--python", sys.executable], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_passes_and_lists_every_stage(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path / "out"), "--budget", "540")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("dry run passed")
    listed = re.findall(r"^  (\S+)\s+(\d+) s  ", done.stdout, flags=re.M)
    assert [name for name, _ in listed] == STAGES
    assert sum(int(limit) for _, limit in listed) <= 540
    for command in ("setup.py build_ext --inplace", "pytest -m gpu tests",
                    "bench --device cuda --ops pool --sizes paper-8b heads", "--tool memcheck",
                    "--tool racecheck", "--tool synccheck", "pytest tests/kernels/test_sass.py -m gpu",
                    "-m tests.support.kernel_cases --backends cuda"):
        assert command in done.stdout, command
    assert "FAIL" not in done.stdout
    assert list((tmp_path / "out").iterdir()) == []  # a dry run writes nothing there


def test_dry_run_fails_without_python_and_rejects_unknown_stages(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--python",
                           str(tmp_path / "no-python")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "FAIL python" in done.stdout and "dry run FAILED" in done.stdout
    done = _run("--dry-run", "--stages", "build,nonsense")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"gpu_check: unknown stage 'nonsense'; stages: {' '.join(STAGES)}")


def test_a_failing_stage_is_recorded_and_summarised(tmp_path):
    """The real run's bookkeeping on the CPU: the sass stage fails (no built extension), the
    summary and the log archive are written, the exit status is non-zero."""
    out = tmp_path / "out"
    done = _run("--out", str(out), "--budget", "60", "--stages", "sass", "--label", "ci")
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "Run: complete" in summary and "- label: ci" in summary
    assert re.search(r"^\| sass \| FAIL \| \d+ \| \d+ \|", summary, flags=re.M)
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/sass.log", "logs/stages.tsv", "logs/info.tsv"} <= set(tar.getnames())


def _junit(path, passed, failed, collection_error):
    cases_xml = [f'<testcase classname="tests.test_k" name="test_ok[{i}]" time="0.1" />' for i in range(passed)]
    cases_xml += [f'<testcase classname="tests.test_k" name="test_bad[{i}]"><failure message="assert 1 == 2">'
                  "x</failure></testcase>" for i in range(failed)]
    if collection_error:
        cases_xml.append('<testcase classname="" name="tests.test_trainer"><error message="collection failure">'
                         "E   ModuleNotFoundError: No module named 'trl'</error></testcase>")
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases_xml)}</testsuite></testsuites>')


def test_publish_writes_the_summary_merged_bench_files_and_logs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "info.tsv").write_text("gpu\tNVIDIA H200\n")
    (work / "plan.tsv").write_text("pytest-gpu\tgpu tests\nbench-pool\tpool bench\nbench-head\thead bench\n"
                                   "racecheck\tracecheck\nmemcheck\tmemcheck\n")
    (work / "stages.tsv").write_text("pytest-gpu\tFAIL\t100\t150\t\nbench-pool\tPASS\t40\t60\t\n"
                                     "bench-head\tTIMEOUT\t60\t60\t\nracecheck\tFAIL\t20\t30\t\n")
    (work / "running").write_text("memcheck\t45\t0\n")
    (work / "racecheck.log").write_text(
        "$ compute-sanitizer --tool racecheck --error-exitcode 3 python cases.py --backends cuda\n"
        "========= COMPUTE-SANITIZER\n"
        "========= Error: Race reported between Write access at pool_forward_kernel+0x1f0\n"
        "20 of 21 cases match the float64 torch reference\n"
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
        "$ compute-sanitizer --tool synccheck --error-exitcode 3 python cases.py --backends cuda\n"
        "21 of 21 cases match the float64 torch reference\n"
        "========= ERROR SUMMARY: 0 errors\n")
    _junit(work / "pytest-gpu.xml", passed=5, failed=2, collection_error=True)
    (work / "pytest-gpu.log").write_text("FAILED tests/test_k.py::test_bad[0]\n")
    (work / "bench-head.log").write_text("r2m bench: 10%|#  | 1/10 [00:01<00:09]\rr2m bench: 20%|## | 2/10\n")
    pool = work / "bench-pool"
    pool.mkdir()
    (pool / "tables.txt").write_text("== pool: table\nbackend size fwd ms\n")
    (pool / "bench.csv").write_text("op,size,backend\npool,paper-8b,triton\npool,heads,triton\n")
    (pool / "bench.json").write_text(json.dumps({"gpu": "NVIDIA H200", "rows": []}))
    (pool / "pool.png").write_bytes(b"\x89PNG")

    assert tools.main(["publish", "--work", str(work), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "stage `memcheck` was running" in summary
    assert "| pytest-gpu | FAIL | 100 | 150 |" in summary and "| memcheck | RUNNING |" in summary
    assert "5 passed, 2 failed, 0 errors, 0 skipped, 1 collection errors" in summary
    assert "tests.test_trainer: ModuleNotFoundError: No module named 'trl'" in summary
    assert "== pool: table" in summary
    assert ("- racecheck: RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings); "
            "20 of 21 cases match the float64 torch reference") in summary
    assert "Error: Race reported between Write access at pool_forward_kernel+0x1f0" in summary
    assert "- synccheck: ERROR SUMMARY: 0 errors; 21 of 21 cases match the float64 torch reference" in summary
    assert "r2m bench: 20%|## | 2/10" in summary and "10%" not in summary  # progress bar, last state
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "logs.tar.gz", "pool.png",
                                                    "summary.md"]
    assert (out / "bench.csv").read_text().splitlines()[1:] == ["pool,paper-8b,triton", "pool,heads,triton"]
    assert json.loads((out / "bench.json").read_text())["runs"][0]["gpu"] == "NVIDIA H200"
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/bench-pool/tables.txt" in tar.getnames()

    (work / "running").unlink()
    assert tools.main(["publish", "--work", str(work), "--out", str(out), "--final"]) == 0
    assert "| memcheck | NOT RUN |" in (out / "summary.md").read_text()


def test_pytest_counts_from_the_log_when_pytest_wrote_no_report(tmp_path):
    (tmp_path / "run.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_a.py::test_x[1]\n"
        "tests/test_a.py::test_y FAILED [ 20%]\n"
        "[gw1] [ 30%] SKIPPED tests/test_a.py::test_z\n")
    counts, failed, _ = tools.pytest_counts(tmp_path / "missing.xml", tmp_path / "run.log")
    assert counts == {"passed": 1, "failed": 1, "skipped": 1}
    assert failed == ["tests/test_a.py::test_y"]


def _fake_toolkit(folder: Path, nvcc_body: str) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\n{nvcc_body}\n")
    nvcc.chmod(0o755)
    return folder


def test_the_cuda_toolkit_is_found_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    """CUDA_HOME first; without it and without a toolkit in the usual places, the toolkit that
    the nvcc on PATH reports, though that nvcc is a wrapper script outside any toolkit."""
    real = _fake_toolkit(tmp_path / "cuda-13.0", f'echo "#\\$ TOP={tmp_path}/cuda-13.0/bin/.." >&2')
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))
    assert tools.find_cuda_home(lambda: [tmp_path / "missing"]) == (real, f"reported by {wrapper}/nvcc")
    usual = _fake_toolkit(tmp_path / "usual", "exit 1")
    assert tools.find_cuda_home(lambda: [tmp_path / "missing", usual]) == (usual, "usual location")
    monkeypatch.setenv("CUDA_HOME", str(usual))
    assert tools.find_cuda_home(lambda: []) == (usual, "CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))
    (wrapper / "nvcc").unlink()
    assert tools.find_cuda_home(lambda: []) is None


def test_the_dry_run_checks_the_build_and_counts_the_gpu_side_tests(tmp_path):
    """What a CPU can check of the real run: the build's limit against its measured need, the
    build folder, the toolkit it would use, the tests a GPU machine collects; too small a
    budget for the build fails the dry run."""
    done = _run("--dry-run", "--out", str(tmp_path / "out"), "--budget", "540", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    need = int(re.search(r"^BUILD_NEED=(\d+)", SCRIPT.read_text(), flags=re.M).group(1))
    limit = int(re.search(r"^  build\s+(\d+) s", done.stdout, flags=re.M).group(1))
    assert limit >= need and f"ok   build limit {limit} s >= the measured cold build, {need} s" in done.stdout
    assert "build folder: " in done.stdout and "build/cuda (in the tree, git-ignored" in done.stdout
    assert "setup.py build_ext --inplace" in done.stdout
    found = tools.find_cuda_home()
    if found:
        assert f"found   CUDA toolkit: {found[0]} ({found[1]}" in done.stdout
    else:
        assert "missing CUDA toolkit" in done.stdout
    gpu_side = int(re.search(r"pytest-gpu: (\d+) tests in \d+ s", done.stdout).group(1))
    cpu_side = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "--collect-only", "-q",
                               "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    cpu_count = int(re.search(r"(\d+)(?:/\d+)? tests? collected", cpu_side.stdout).group(1))
    assert gpu_side > cpu_count  # the cuda and triton parameters a CPU machine does not collect
    too_small = _run("--dry-run", "--out", str(tmp_path / "out2"), "--budget", "60", "--stages", "build", timeout=300)
    assert too_small.returncode == 1 and "FAIL build limit" in too_small.stdout, too_small.stdout


def test_the_gpu_tests_run_kernels_first_then_api_then_the_rest(tmp_path):
    """R2M_RUN_FIRST (set by the script) orders the collected tests, as a GPU machine collects
    them: tests/kernels, then tests/api, then the others; the ids file lists each test once."""
    ids = tmp_path / "ids.txt"
    first = re.search(r'^export R2M_RUN_FIRST="([^"]+)"', SCRIPT.read_text(), flags=re.M).group(1)
    env = {**os.environ, "R2M_COLLECTED_IDS": str(ids), "R2M_RUN_FIRST": first}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.support.as_if_cuda", "-m", "gpu", "tests",
                           "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = ids.read_text().splitlines()
    assert len(collected) == len(set(collected)) > 0
    assert first.split() == ["tests/kernels/", "tests/api/"]
    folder = [0 if i.startswith("tests/kernels/") else 1 if i.startswith("tests/api/") else 2 for i in collected]
    assert folder == sorted(folder) and set(folder) == {0, 1, 2}


def _fake_sanitizer(folder: Path, output: str, rc: int) -> None:
    folder.mkdir()
    tool = folder / "compute-sanitizer"
    tool.write_text(f"#!/bin/sh\necho '{output}'\nexit {rc}\n")
    tool.chmod(0o755)


def test_a_sanitizer_that_refuses_the_device_is_unavailable_not_failed(tmp_path):
    """"Device not supported" is UNAVAILABLE within seconds, and racecheck does not try again;
    a sanitizer that reports errors (its --error-exitcode 3) is FAIL, errors found."""
    refusing = tmp_path / "refusing"
    _fake_sanitizer(refusing, "========= Error: Device not supported", 1)
    env = {**os.environ, "PATH": f"{refusing}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out"), "--budget", "120", "--stages",
                           "memcheck,racecheck", "--python", sys.executable], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode != 0
    for stage in ("memcheck", "racecheck"):
        row = re.search(rf"^\| {stage} \| (\w+) \| (\d+) \|.*$", summary, flags=re.M)
        assert row and row.group(1) == "UNAVAILABLE" and int(row.group(2)) < 30, summary
        assert "compute-sanitizer unavailable on this device" in row.group(0)
    finding = tmp_path / "finding"
    _fake_sanitizer(finding, "========= ERROR SUMMARY: 2 errors", 3)
    env["PATH"] = f"{finding}:{os.environ['PATH']}"
    subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out3"), "--budget", "60", "--stages", "memcheck",
                    "--python", sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    row = re.search(r"^\| memcheck \| (\w+) \|.*$", (tmp_path / "out3" / "summary.md").read_text(), flags=re.M)
    assert row and row.group(1) == "FAIL" and "errors found" in row.group(0)


def test_the_summary_names_the_tests_a_cut_short_run_did_not_reach(tmp_path):
    collected = tmp_path / "pytest-gpu-collected.txt"
    collected.write_text("tests/test_k.py::test_ok[0]\ntests/test_k.py::test_bad[0]\n"
                         "tests/test_k.py::test_late[0]\ntests/sub/test_m.py::TestX::test_y[a.b]\n")
    _junit(tmp_path / "pytest-gpu.xml", passed=1, failed=1, collection_error=False)
    total, missing = tools.not_reached(collected, tmp_path / "pytest-gpu.xml", tmp_path / "pytest-gpu.log")
    assert (total, missing) == (4, ["tests/test_k.py::test_late[0]", "tests/sub/test_m.py::TestX::test_y[a.b]"])
    (tmp_path / "pytest-gpu.xml").unlink()
    (tmp_path / "pytest-gpu.log").write_text("[gw0] [ 25%] PASSED tests/sub/test_m.py::TestX::test_y[a.b]\n")
    total, missing = tools.not_reached(collected, tmp_path / "pytest-gpu.xml", tmp_path / "pytest-gpu.log")
    assert missing == ["tests/test_k.py::test_ok[0]", "tests/test_k.py::test_bad[0]", "tests/test_k.py::test_late[0]"]
    lines = tools._section_pytest(tmp_path, "pytest-gpu")
    assert "Not reached (3 of 4 collected; the run was cut short):" in lines and "- tests/test_k.py: 3" in lines
