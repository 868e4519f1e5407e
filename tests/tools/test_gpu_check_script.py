"""scripts/gpu_check.sh and tests.support.gpu_check, on the CPU: the dry run passes and lists
every stage, the real run's bookkeeping writes a summary for a failing stage, and the checks
that decide pass/fail can fail. (The kernel cases are checked in tests/kernels/test_kernel_cases.py,
the SASS parse in tests/kernels/test_sass.py.)"""

from __future__ import annotations

import json
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
    for command in ("pip install --no-index --no-deps --no-build-isolation", "pytest -m gpu tests",
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
