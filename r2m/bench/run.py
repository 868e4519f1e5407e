"""The run of `r2m bench` (its command line is r2m.cli.bench): fused kernels against the eager
formula, and R2M's update against a full RM update.

For each op (cases.OPS), size (sizes.SIZES) and backend it times forward, backward and
forward+backward (medians of triton.testing.do_bench on the GPU, of a wall-clock timer
after warm-up on the CPU), records the peak extra memory (GPU only), states each time as a
percentage of the floor set by the measured read bandwidth, and the speedup over the op's
baseline. Prints one table per op and writes bench.csv, bench.json (with the machine and
versions), tables.txt and one PNG per op to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import os
import platform
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from .cases import BUILDERS, OPS, backends_for, with_pool_variants
from .measure import Timer, measure_bandwidth, peak_memory
from .report import Row, derive, plot, table, write_csv, write_json
from .sizes import CPU_DEFAULT, GPU_DEFAULT, SIZES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _flat(lists):
    return None if lists is None else list(dict.fromkeys(n for names in lists for n in names))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _measure(row: Row, case, timer: Timer, device: torch.device, split: bool, slow: bool) -> None:
    """Fill row's times, peak memory and note from `case`."""
    median = timer.wall_median_ms if slow else timer.median_ms
    with case.scope():
        _measure_in_scope(row, case, median, device, split)
    row.note = case.note


def _measure_in_scope(row: Row, case, median, device: torch.device, split: bool) -> None:
    if split:
        row.forward_ms = median(case.forward, case.leaves)
        out = case.forward()
        row.backward_ms = median(lambda: case.backward(out), case.leaves)
        del out
    row.fwd_bwd_ms = median(case.step, case.leaves)
    for leaf in case.leaves:
        leaf.grad = None
    row.peak_extra_bytes, row.peak_total_bytes = peak_memory(case.step, device)


def _run_case(op: str, size, backend: str, dtype, device, args, timer: Timer, slow_timer: Timer,
              bandwidth) -> Row:
    row = Row(op, size.name, backend, _dtype_name(dtype), device.type)
    if op == "rm-update" and backend == "rm-full":
        from .rm_update import fitting_rm_full_case

        case = fitting_rm_full_case(size, args.rm_backbone, dtype, device, args.rm_micro_pairs)
        _measure(row, case, slow_timer, device, split=False, slow=True)
        return row
    builder = BUILDERS["update" if op == "rm-update" else op]
    case = builder(size, backend.removeprefix("r2m-"), dtype, device)
    _measure(row, case, slow_timer if op == "rm-update" else timer, device,
             split=OPS[op].split, slow=op == "rm-update")
    if case.hidden_bytes is not None:
        row.floor_pass_ms = bandwidth.floor_ms(case.hidden_bytes, 1)
    return row


def _plan(ops, sizes, wanted, device, pool_variants=False):
    """[(op, size, backend)] to run, and {op: {backend: why it is not timed}}."""
    plan, not_timed = [], {}
    for op in ops:
        names, not_timed[op] = backends_for(OPS[op], device)
        baseline = OPS[op].baseline
        names = [n for n in names if wanted is None or n == baseline or n.removeprefix("r2m-") in wanted]
        if pool_variants and op == "pool":
            names = with_pool_variants(names)
        plan += [(op, size, name) for size in sizes for name in names]
    return plan, not_timed


def run_benchmark(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # the thread count is process-wide: leave it as it was for the caller
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        print("r2m bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16 if on_gpu else torch.float32
    sizes = [SIZES[n] for n in (_flat(args.sizes) or (GPU_DEFAULT if on_gpu else CPU_DEFAULT))]
    if args.num_heads:
        sizes = [dataclasses.replace(s, name=f"{s.name}/h{n}", num_heads=n) for s in sizes
                 for n in dict.fromkeys(n for counts in args.num_heads for n in counts)]
        uneven = [s.name for s in sizes if s.attn_dim % s.num_heads]
        if uneven:
            print(f"r2m bench: --num-heads must divide each size's d; it does not at {', '.join(uneven)}",
                  file=sys.stderr)
            return 2
    ops = _flat(args.ops) or list(OPS)
    wanted = _flat(args.backends)
    timer = Timer(device, args.warmup_ms, args.rep_ms)
    slow_timer = Timer(device, warmup=1, reps=args.rm_reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = _machine(device)

    bandwidth = measure_bandwidth(device, timer, (args.bandwidth_mib or (1024 if on_gpu else 64)) * 2**20)
    headline = (f"r2m bench on {machine}, {_dtype_name(dtype)}: read bandwidth {bandwidth.read / 1e9:.1f} GB/s "
                f"({bandwidth.read_method}); torch.sum {bandwidth.torch_sum / 1e9:.1f} GB/s; copy "
                f"{bandwidth.copy / 1e9:.1f} GB/s (read + write); {bandwidth.buffer_bytes / 2**20:.0f} MiB buffer")
    print(headline, flush=True)

    plan, not_timed = _plan(ops, sizes, wanted, device, args.pool_variants)
    rows = []
    interrupted = False
    progress = tqdm(plan, desc="r2m bench", unit="case", file=sys.stderr)
    try:
        for op, size, backend in progress:
            progress.set_postfix_str(f"{op} {size.name} {backend}")
            try:
                rows.append(_run_case(op, size, backend, dtype, device, args, timer, slow_timer, bandwidth))
            except Exception as exc:  # one failing row must not hide the others; it fails the run below
                traceback.print_exc()
                rows.append(Row(op, size.name, backend, _dtype_name(dtype), device.type,
                                error=f"{type(exc).__name__}: {exc}"))
            _free(device)
    except KeyboardInterrupt:  # a time limit cut the run short: report and write what finished
        interrupted = True
        progress.close()
        print(f"\nr2m bench: interrupted after {len(rows)} of {len(plan)} cases", file=sys.stderr)
    derive(rows, bandwidth)

    text = "\n\n".join([headline] + [table(op, [r for r in rows if r.op == op], not_timed[op]) for op in ops])
    print("\n" + text)
    (out / "tables.txt").write_text(text + "\n")
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "machine": machine, "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "r2m")},
        "cuda": torch.version.cuda, "dtype": _dtype_name(dtype),
        "arguments": dict(vars(args), out=str(out), sizes=[s.name for s in sizes], ops=ops, backends=wanted),
        "sizes": {s.name: s.as_dict() for s in sizes}, "bandwidth": bandwidth.as_dict(),
        "not_timed": not_timed,
    }
    write_csv(out / "bench.csv", rows)
    write_json(out / "bench.json", meta, rows)
    for op in ops:
        plot(out / f"{op}.png", op, [r for r in rows if r.op == op], f"{machine}, {meta['dtype']}, {meta['date']}")
    print(f"\nwrote {out}/bench.csv, bench.json, tables.txt and {', '.join(op + '.png' for op in ops)}")
    failed = [r for r in rows if r.error]
    if failed:
        print(f"r2m bench: {len(failed)} case(s) failed (see the notes above)", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0
