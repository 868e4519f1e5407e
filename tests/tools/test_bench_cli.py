"""`r2m bench`: the CPU smoke run end to end, the read-bandwidth kernel, and the arithmetic
behind the tables (floor percentages, speedups)."""

import csv
import dataclasses
import importlib.metadata
import json
import math

import pytest
import torch

from r2m.bench import cases
from r2m.bench.cases import BUILDERS, OPS, backends_for
from r2m.bench.measure import Bandwidth, Timer, peak_memory
from r2m.bench.read_kernel import BLOCK, read_sum, read_sum_partials_buffer
from r2m.bench.report import Row, derive
from r2m.bench.sizes import SIZES
from r2m.cli import main

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Short timing budgets and one thread: the smoke run checks the machinery, not the numbers.
FAST = ["--warmup-ms", "2", "--rep-ms", "10", "--rm-reps", "1", "--bandwidth-mib", "8", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _float(text):
    return None if text == "" else float(text)


@pytest.fixture(scope="module")
def tiny_cpu_run(tmp_path_factory):
    """One `r2m bench --sizes tiny-cpu` run on the CPU, all ops: its exit code, directory and stdout."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(stdout):
        rc = main(["bench", "--sizes", "tiny-cpu", "--device", "cpu", "--out", str(out), *FAST])
    assert torch.get_num_threads() == threads, "r2m bench must restore the caller's thread count"
    return rc, out, stdout.getvalue()


def test_tiny_cpu_run_writes_every_output(tiny_cpu_run):
    rc, out, _ = tiny_cpu_run
    assert rc == 0
    for name in ["bench.csv", "bench.json", "tables.txt"] + [f"{op}.png" for op in OPS]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for op in OPS:
        assert (out / f"{op}.png").read_bytes()[:8] == PNG_MAGIC, op


def test_tiny_cpu_rows_are_the_expected_backends_with_finite_positive_times(tiny_cpu_run):
    _, out, _ = tiny_cpu_run
    with open(out / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    cpu = torch.device("cpu")
    for op, spec in OPS.items():
        got = [r["backend"] for r in rows if r["op"] == op]
        expected, not_timed = backends_for(spec, cpu)
        assert got == expected, op
        assert got[0] == spec.baseline and "triton" not in got and "triton" in not_timed, op
        assert ("r2m-torch" if op == "rm-update" else "torch") in got, op
    for r in rows:
        assert r["size"] == "tiny-cpu" and r["device"] == "cpu" and r["error"] == "", r
        timed = ["fwd_bwd_ms"] + (["forward_ms", "backward_ms"] if OPS[r["op"]].split else [])
        for key in timed:
            value = _float(r[key])
            assert value is not None and math.isfinite(value) and value > 0, (r["op"], r["backend"], key)
        if not OPS[r["op"]].split:
            assert r["forward_ms"] == r["backward_ms"] == ""
        assert r["peak_extra_bytes"] == r["peak_total_bytes"] == ""  # no peak counter on the CPU
        base = next(b for b in rows if b["op"] == r["op"] and b["backend"] == OPS[r["op"]].baseline)
        assert _float(r["speedup_fwd_bwd"]) == pytest.approx(float(base["fwd_bwd_ms"]) / float(r["fwd_bwd_ms"]))
        has_floor = OPS[r["op"]].floor_passes is not None
        assert (r["pct_floor_fwd_bwd"] != "") == has_floor, r["op"]


def test_tiny_cpu_json_and_tables(tiny_cpu_run):
    _, out, stdout = tiny_cpu_run
    data = json.loads((out / "bench.json").read_text())
    assert data["device"] == "cpu" and data["gpu"] is None and data["versions"]["torch"] == importlib.metadata.version("torch")
    assert data["date"] and data["machine"]
    assert data["bandwidth"]["read_bytes_per_s"] > 0 and data["bandwidth"]["copy_bytes_per_s"] > 0
    assert data["sizes"]["tiny-cpu"]["batch"] == SIZES["tiny-cpu"].batch
    with open(out / "bench.csv") as fh:
        assert len(data["rows"]) == len(list(csv.DictReader(fh)))
    rm_full = next(r for r in data["rows"] if r["backend"] == "rm-full")
    assert "tiny shape" in rm_full["note"] and "params" in rm_full["note"]  # the backbone size is stated
    for op in OPS:
        assert f"== {op}:" in stdout
        n_rows = sum(r["op"] == op for r in data["rows"])
        section = stdout.split(f"== {op}:")[1].split("\n== ")[0]
        assert sum(line.split()[1:2] == ["tiny-cpu"] for line in section.splitlines()) == n_rows, op
    assert "triton not timed" in stdout
    assert (out / "tables.txt").read_text().strip() in stdout


def test_a_failing_case_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setitem(cases.BUILDERS, "grebt", broken)
    rc = main(["bench", "--sizes", "tiny-cpu", "--device", "cpu", "--ops", "grebt,head",
               "--backends", "torch", "--out", str(tmp_path), *FAST])
    assert rc == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["backend"] for r in rows if r["op"] == "head"} == {"eager", "torch"}  # baseline always kept
    assert all(r["error"] == "" and r["fwd_bwd_ms"] > 0 for r in rows if r["op"] == "head")
    assert all("deliberately broken" in r["error"] for r in rows if r["op"] == "grebt")
    assert "FAILED" in capsys.readouterr().out


def test_unknown_size_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "paper-9b"])
    assert "paper-9b" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["pool", "head", "grebt", "update"])
def test_cases_differentiate_every_leaf(op):
    """What the bench times is a real backward: every leaf gets a finite gradient, and the
    update step moves the parameters."""
    size = SIZES["tiny-cpu"]
    names, _ = backends_for(OPS[op], DEVICE)
    for backend in names:
        if backend == "compile":
            continue  # the compiled rows are the eager ones compiled; compiling here is too slow
        case = BUILDERS[op](size, backend, torch.float32, DEVICE)
        before = [t.detach().clone() for t in case.leaves]
        case.step()
        for leaf, old in zip(case.leaves, before):
            assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), (op, backend)
            if op == "update" and leaf.numel() == 1:
                # The score bias: GREBT sees only differences and standardised rewards, so a
                # shift of every reward changes nothing and the bias gets no gradient.
                assert leaf.grad.abs().item() < 1e-5, (op, backend)
                continue
            assert leaf.grad.abs().sum() > 0, (op, backend)
            assert (op == "update") == (not torch.equal(leaf.detach(), old)), (op, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_read_kernel_sums_every_block(dtype):
    """The bandwidth kernel must really read every element (odd length, last block partial)."""
    x = torch.randn(3 * BLOCK + 37, device=DEVICE).to(dtype)
    partials = read_sum_partials_buffer(x).fill_(float("nan"))
    read_sum(x, partials)
    padded = torch.cat([x.double(), x.new_zeros(4 * BLOCK - x.numel(), dtype=torch.float64)])
    expected = padded.view(4, BLOCK).sum(1)
    torch.testing.assert_close(partials.double(), expected, rtol=1e-5, atol=1e-3)


def test_derive_floor_and_speedup():
    bandwidth = Bandwidth(read=2e9, read_method="test", torch_sum=2e9, copy=3e9, buffer_bytes=1)
    pass_ms = bandwidth.floor_ms(10**6, 1)
    assert pass_ms == pytest.approx(10**6 / 2e9 * 1e3)
    base = Row("pool", "tiny-cpu", "eager", "float32", "cpu", 4.0, 6.0, 10.0, floor_pass_ms=pass_ms)
    fast = Row("pool", "tiny-cpu", "torch", "float32", "cpu", 1.0, 2.0, 2.5, floor_pass_ms=pass_ms)
    other_size = Row("pool", "long", "torch", "float32", "cpu", 1.0, 1.0, 1.0, floor_pass_ms=pass_ms)
    derive([base, fast, other_size], bandwidth)
    assert (fast.speedup_fwd, fast.speedup_bwd, fast.speedup_fwd_bwd) == (4.0, 3.0, 4.0)
    assert fast.pct_floor_fwd == pytest.approx(100 * pass_ms / 1.0)
    assert fast.pct_floor_fwd_bwd == pytest.approx(100 * 2 * pass_ms / 2.5)
    assert other_size.speedup_fwd_bwd is None  # no baseline at that size


def test_timer_clears_grads_and_cpu_has_no_peak_counter():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None
        calls.append(1)
        x.sum().backward()

    ms = Timer(torch.device("cpu"), warmup_ms=1, rep_ms=1).median_ms(fn, [x])
    assert ms > 0 and len(calls) >= 1 + Timer.MIN_REPS
    assert peak_memory(fn, torch.device("cpu")) == (None, None)


@pytest.mark.gpu
def test_tiny_run_on_the_gpu_times_the_kernel_backends_and_memory(tmp_path):
    rc = main(["bench", "--sizes", "tiny-cpu", "--device", "cuda", "--out", str(tmp_path),
               "--rm-backbone", "tiny", "--warmup-ms", "5", "--rep-ms", "20", "--rm-reps", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["bandwidth"]["read_method"].startswith("Triton") and data["gpu"]
    for op, spec in OPS.items():
        expected, _ = backends_for(spec, torch.device("cuda"))
        assert [r["backend"] for r in data["rows"] if r["op"] == op] == expected
    for r in data["rows"]:
        assert r["error"] == "" and r["fwd_bwd_ms"] > 0 and r["peak_total_bytes"] > 0, r


def test_pool_variants_split_the_triton_row_only():
    assert cases.with_pool_variants(["eager", "torch", "triton", "cuda"]) == [
        "eager", "torch", "triton:per-head", "triton:many-heads", "cuda"]


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ["per-head", "many-heads"])
def test_pool_variant_case_runs_under_its_forced_variant(variant):
    from r2m_kernels.triton.attention_pool_many_heads import uses_many_heads

    # n_h 1 would take per-head and n_h 32 many-heads unforced: each case must take its own.
    for num_heads in (1, 32):
        size = dataclasses.replace(SIZES["tiny-cpu"], batch=4, seq_len=24, policy_dim=40, num_heads=num_heads)
        case = BUILDERS["pool"](size, f"triton:{variant}", torch.bfloat16, torch.device("cpu"))
        with case.scope():
            assert uses_many_heads(torch.empty(0, dtype=torch.bfloat16), num_heads) == (variant == "many-heads")
            case.step()
        assert case.leaves[0].grad is not None and torch.isfinite(case.leaves[0].grad).all()
        assert case.note == f"{variant} variant forced"
    assert uses_many_heads(torch.empty(0, dtype=torch.bfloat16), 1) is False  # the scope ended


def test_num_heads_sweep_names_each_size_and_rejects_uneven_counts(tmp_path, capsys):
    rc = main(["bench", "--sizes", "tiny-cpu", "--ops", "grebt", "--num-heads", "1,2", "--out", str(tmp_path),
               "--warmup-ms", "1", "--rep-ms", "2", "--bandwidth-mib", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted({r["size"] for r in rows}) == ["tiny-cpu/h1", "tiny-cpu/h2"]
    assert main(["bench", "--sizes", "tiny-cpu", "--num-heads", "3", "--out", str(tmp_path)]) == 2
    assert "--num-heads must divide each size's d; it does not at tiny-cpu/h3" in capsys.readouterr().err
