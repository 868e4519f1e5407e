"""`r2m bench`: its command line (the run is r2m.bench.run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.cases import OPS, POOL_VARIANTS
from ..bench.run import DTYPES
from ..bench.sizes import CPU_DEFAULT, GPU_DEFAULT, SIZES

HELP = ("Benchmark the fused R2M kernels against the eager formula (tables, CSV, JSON, plots); "
        "the CPU runs the tiny-cpu size as a smoke test")


def _counts(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        counts = [int(n) for n in text.split(",") if n]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each count must be >= 1")
    return counts


def _names(choices):
    """argparse type: comma- or space-separated names, each one of `choices`."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.rm_update import BACKBONES

    parser.add_argument("--sizes", type=_names(list(SIZES)), nargs="+",
                        help=f"sizes (docs/design.md §6): {', '.join(SIZES)}; default {','.join(GPU_DEFAULT)} on "
                             f"the GPU, {','.join(CPU_DEFAULT)} on the CPU")
    parser.add_argument("--ops", type=_names(list(OPS)), nargs="+", help=f"ops: {', '.join(OPS)} (default all)")
    parser.add_argument("--num-heads", type=_counts, nargs="+",
                        help="run each size once per head count n_h given here instead of at its own "
                             "(rows name the size SIZE/hN); each must divide the size's d")
    parser.add_argument("--pool-variants", action="store_true",
                        help=f"pool: one triton row per variant of the Triton attention pool "
                             f"({', '.join(POOL_VARIANTS)}), each forced, instead of the choice by n_h "
                             f"(docs/design.md §2.4); with --num-heads this is the sweep that places "
                             f"MANY_HEADS_MIN")
    parser.add_argument("--backends", type=_names(["eager", "compile", "torch", "triton", "cuda"]), nargs="+",
                        help="backends to time (default: all that can run here); each op's baseline "
                             "row (eager, rm-full) is always timed")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of hidden and rte (auto: bf16 on the GPU, fp32 on the CPU)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    parser.add_argument("--warmup-ms", type=float, default=25,
                        help="warm-up time per measurement (do_bench's on the GPU, a timing loop's on the CPU)")
    parser.add_argument("--rep-ms", type=float, default=100,
                        help="measuring time per measurement; the median is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch intra-op threads (default: torch's own choice); 1 gives steadier "
                             "times on a busy machine")
    parser.add_argument("--rm-backbone", choices=["auto", *BACKBONES], default="auto",
                        help="rm-update backbone shape (auto: the largest Llama shape that fits the GPU; "
                             "tiny on the CPU)")
    parser.add_argument("--rm-micro-pairs", type=int, default=None,
                        help="rm-update: pairs per forward/backward (default 4 on the GPU, all on the CPU)")
    parser.add_argument("--rm-reps", type=int, default=3, help="rm-update: timed steps per row (after one warm-up)")
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="buffer for the bandwidth measurement (default 1024 MiB on the GPU, 64 on the CPU)")


def run(args: argparse.Namespace) -> int:
    from ..bench.run import run_benchmark

    return run_benchmark(args)
