"""Every r2m GPU kernel once, at small odd sizes, checked against the torch backend in float64.

scripts/gpu_check.sh runs these cases plainly first (which also fills the Triton cache, so
that nothing compiles under instrumentation), then under compute-sanitizer: memcheck on every
case, racecheck and synccheck on the cuda ones. A kernel that computes garbage fails here as
well as under the sanitizer.

    python -m tests.support.kernel_cases                        # every case, on the GPU
    python -m tests.support.kernel_cases --backends cuda        # the cuda kernels only
    python -m tests.support.kernel_cases --match '*packed*'     # a subset (fnmatch on the name)
    python -m tests.support.kernel_cases --list                 # the cases, nothing run
    python -m tests.support.kernel_cases --device cpu --substitute-backend torch
                                      # the cases themselves checked on the CPU (inputs,
                                      # gradients, comparisons), the torch backend standing in

What the cases cover: the Triton attention pool, per-head and many-head variants, padded with
a holed mask and packed, direct (S <= 64, one program per sequence) and flash-decoding split
(S = 300 with a few sequences), backward into q alone and into q and hidden, in bf16 with
fp16 and fp32 spot cases; the cuda attention pool on the 16-byte vector and the scalar paths
(D_p divisible by 8 or odd) at each of its three column tiles (D_p up to 2048, 8192, 16384),
several heads, fp16 and fp32 spot cases; GREBT uniform, ragged (a group of 1 up to 2000, past
the cuda warp kernel's 512) and per-group losses without gradient, on both backends;
score_mix forward and backward (Triton).

Exit status: 0 when every case matches its reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from r2m_kernels import attention_pool, grebt_loss, score_mix

KERNEL_BACKENDS = ("triton", "cuda")

# ||got - want|| / ||want|| allowed per dtype of the kernel's inputs. Loose enough for 16-bit
# outputs and tf32 dots, far below what a wrong kernel gives (O(1)); the precise error rule is
# the pytest gpu suite's job.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 5e-3}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Sequence lengths that take the direct path (one chunk: at most 64 positions) and the
# flash-decoding split (a few sequences of 300 positions cannot fill a GPU).
DIRECT_S, SPLIT_S = 37, 300
BATCH = 3


@dataclass(frozen=True)
class Case:
    name: str
    backend: str
    op: str  # attention_pool, grebt_loss or score_mix
    run: Callable[[str, torch.device], dict] = field(compare=False)
    tolerance: float


# ---- inputs -------------------------------------------------------------------------------------

def _lengths(batch: int, seq_len: int) -> list[int]:
    """Ragged valid lengths: the first sequence full, the others shorter, none empty."""
    return [max(1, seq_len - (b * seq_len) // (batch + 1)) for b in range(batch)]


def _holed_mask(batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(B, S) bool: random holes, left padding on one row, at least one valid position each."""
    mask = torch.rand(batch, seq_len, generator=generator) < 0.8
    mask[-1, : seq_len // 3] = False
    mask[torch.arange(batch), torch.randint(0, seq_len, (batch,), generator=generator).clamp_min(seq_len // 3)] = True
    return mask


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def check_outputs(outputs: dict, tolerance: float) -> tuple[bool, dict]:
    """outputs {name: (got, want)} -> (all within tolerance, {name: relative error}). A shape
    mismatch, NaN or Inf fails."""
    errors = {}
    for name, (got, want) in outputs.items():
        if got.shape != want.shape:
            errors[name] = float("nan")
        else:
            errors[name] = _relative_error(got, want) if torch.isfinite(got).all() else float("inf")
    return all(e <= tolerance for e in errors.values()), errors


# ---- the ops, each run on a backend and on the float64 torch reference ---------------------------

def _pool(backend, device, *, dtype, layout, seq_len, dim, heads, dhidden, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = _lengths(BATCH, seq_len)
    if layout == "packed":
        hidden = torch.randn(sum(lengths), dim, generator=gen)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        mask = None
    else:
        hidden = torch.randn(BATCH, seq_len, dim, generator=gen)
        mask, cu_seqlens = _holed_mask(BATCH, seq_len, gen), None
    q = torch.randn(BATCH, heads, dim, generator=gen)
    grad = torch.randn(BATCH, heads, dim, generator=gen)
    scale = 1.0 / math.sqrt(dim)
    extras = {k: v.to(device) for k, v in (("mask", mask), ("cu_seqlens", cu_seqlens)) if v is not None}

    def pooled_and_grads(name, hidden_x, q_x, grad_x):
        hidden_x = hidden_x.detach().requires_grad_(dhidden)
        q_x = q_x.detach().requires_grad_()
        out = attention_pool(hidden_x, q_x, scale, backend=name, **extras)
        inputs = (q_x, hidden_x) if dhidden else (q_x,)
        return (out, *torch.autograd.grad(out, inputs, grad_x.to(out.dtype)))

    # The kernel gets hidden rounded to `dtype` and fp32 q; the reference the same values in fp64.
    low_hidden, low_q = hidden.to(device, dtype), q.to(device)
    got = pooled_and_grads(backend, low_hidden, low_q, grad.to(device))
    want = pooled_and_grads("torch", low_hidden.double(), low_q.double(), grad.to(device, dtype).double())
    names = ("pooled", "dq", "dhidden")
    return {name: (g, w) for name, g, w in zip(names, got, want)}


def _grebt(backend, device, *, dtype, sizes, reduction, with_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(sum(sizes), generator=gen).to(device, dtype)
    uniform = len(set(sizes)) == 1
    kwargs = ({"group_size": sizes[0]} if uniform else
              {"cu_groups": torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()],
                                         dtype=torch.int32, device=device)})
    grad_output = torch.randn(len(sizes), generator=gen).to(device) if reduction == "none" else None

    def loss_and_grad(name, r):
        r = r.detach().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            loss = grebt_loss(r, **kwargs, reduction=reduction, backend=name)
        if not with_grad:
            return (loss,)
        go = grad_output.to(loss.dtype) if grad_output is not None else None
        return (loss, *torch.autograd.grad(loss, r, go))

    got = loss_and_grad(backend, rewards)
    want = loss_and_grad("torch", rewards.double())
    return {name: (g, w) for name, g, w in zip(("loss", "drewards"), got, want)}


def _score_mix(backend, device, *, rte_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, attn_dim, rm_dim = 37, 48, 203
    tensors = {
        "attended": torch.randn(batch, attn_dim, generator=gen),
        "rte": torch.randn(batch, rm_dim, generator=gen),
        "out_weight": torch.randn(rm_dim, attn_dim, generator=gen) / math.sqrt(attn_dim),
        "score_weight": torch.randn(1, rm_dim, generator=gen) / math.sqrt(rm_dim),
        "score_bias": torch.randn(1, generator=gen),
    }
    grad = torch.randn(batch, generator=gen).to(device)
    low = {k: v.to(device, rte_dtype if k == "rte" else torch.float32) for k, v in tensors.items()}

    def rewards_and_grads(name, inputs):
        inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out = score_mix(*inputs.values(), omega=0.35, backend=name)
        return (out, *torch.autograd.grad(out, list(inputs.values()), grad.to(out.dtype)))

    got = rewards_and_grads(backend, low)
    want = rewards_and_grads("torch", {k: v.double() for k, v in low.items()})
    names = ("rewards", *(f"d{k}" for k in tensors))
    return {name: (g, w) for name, g, w in zip(names, got, want)}


# ---- the case list ------------------------------------------------------------------------------

def _pool_case(backend, dtype, layout, seq_len, dim, heads, dhidden, seed):
    path = "direct" if seq_len <= 64 else "split"
    grads = "dq+dh" if dhidden else "dq"
    name = f"{backend}-pool-{DTYPE_NAMES[dtype]}-{layout}-{path}-D{dim}-h{heads}-{grads}"
    run = partial(_pool, dtype=dtype, layout=layout, seq_len=seq_len, dim=dim, heads=heads,
                  dhidden=dhidden, seed=seed)
    return Case(name, backend, "attention_pool", run, TOLERANCE[dtype])


def _grebt_cases(backend, seed):
    uniform, ragged = [8] * 13, [1, 3, 8, 37, 600, 2000]
    return [
        Case(f"{backend}-grebt-fp32-uniform-K8", backend, "grebt_loss",
             partial(_grebt, dtype=torch.float32, sizes=uniform, reduction="mean", with_grad=True, seed=seed),
             1e-3),
        Case(f"{backend}-grebt-fp32-ragged-1..2000", backend, "grebt_loss",
             partial(_grebt, dtype=torch.float32, sizes=ragged, reduction="mean", with_grad=True, seed=seed + 1),
             1e-3),
        Case(f"{backend}-grebt-bf16-ragged-none-nograd", backend, "grebt_loss",
             partial(_grebt, dtype=torch.bfloat16, sizes=ragged, reduction="none", with_grad=False, seed=seed + 2),
             1e-3),
    ]


def all_cases() -> list[Case]:
    cases, seed = [], 0
    bf16 = torch.bfloat16
    # Triton attention pool. n_h = 1 takes the per-head variant and n_h = 16 the many-head
    # (tensor-core) one, whatever threshold between them the GPU sweep sets; D_p 203 is odd.
    for heads in (1, 16):
        for layout in ("mask", "packed"):
            for seq_len in (DIRECT_S, SPLIT_S):
                for dhidden in (False, True):
                    seed += 1
                    cases.append(_pool_case("triton", bf16, layout, seq_len, 203, heads, dhidden, seed))
        seed += 2
        cases.append(_pool_case("triton", torch.float32, "mask", SPLIT_S, 203, heads, True, seed))
        cases.append(_pool_case("triton", torch.float16, "packed", DIRECT_S, 203, heads, False, seed + 1))
    seed += 1
    cases.append(_pool_case("triton", bf16, "mask", SPLIT_S, 203, 2, True, seed))  # per-head, a loop over heads
    cases += _grebt_cases("triton", 100)
    cases += [Case(f"triton-score_mix-rte-{DTYPE_NAMES[d]}", "triton", "score_mix",
                   partial(_score_mix, rte_dtype=d, seed=200 + i), TOLERANCE[d])
              for i, d in enumerate((bf16, torch.float32))]
    # cuda attention pool: each column tile (D_p <= 2048, <= 8192, <= 16384), vector (D_p a
    # multiple of 8) and scalar (odd) paths; one case with dhidden, one without, per tile.
    for dim in (256, 203, 4096, 4099, 12288, 12291):
        seed += 2
        cases.append(_pool_case("cuda", bf16, "mask", SPLIT_S, dim, 1, True, seed))
        cases.append(_pool_case("cuda", bf16, "packed", DIRECT_S, dim, 1, False, seed + 1))
    for dtype in (torch.float16, torch.float32):
        for dim in (256, 203):
            seed += 1
            cases.append(_pool_case("cuda", dtype, "mask", SPLIT_S, dim, 1, True, seed))
    for dhidden in (False, True):  # several heads: dq accumulates through global memory
        seed += 1
        cases.append(_pool_case("cuda", bf16, "mask", SPLIT_S, 256, 3, dhidden, seed))
    cases += _grebt_cases("cuda", 300)
    return cases


# ---- the path a pool case's forward takes, for the report ------------------------------------
# Read from two r2m_kernels internals (attention_pool_many_heads.uses_many_heads,
# splits.num_splits): no public API says which variant and split count a call takes. If they
# move, this fails loudly rather than reporting a guess.

def _internal_pool_path(case_backend: str, hidden_dtype, heads: int, batch: int, seq_len: int,
                        device: torch.device) -> str:
    from r2m_kernels.splits import num_splits

    variant, programs = "", batch * heads
    if case_backend == "triton":
        from r2m_kernels.triton.attention_pool_many_heads import uses_many_heads

        if uses_many_heads(torch.empty(0, dtype=hidden_dtype), heads):
            variant, programs = "many-head ", batch  # one program per sequence for all heads
        else:
            variant = "per-head "
    return f"{variant}n_split {num_splits(programs, seq_len, device)}"


# ---- running ------------------------------------------------------------------------------------

def _poison_cached_memory(device: torch.device) -> None:
    """Fill memory the caching allocator will hand out again with NaN, in both its pools, so
    that an output position a kernel never writes shows up as NaN."""
    blocks = [torch.full((1 << 17,), float("nan"), device=device) for _ in range(16)]  # small pool
    blocks.append(torch.full((1 << 25,), float("nan"), device=device))  # large pool
    del blocks


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=KERNEL_BACKENDS, default=list(KERNEL_BACKENDS),
                        help="kernel backends whose cases run (default: all)")
    parser.add_argument("--match", default="*", help="run the cases whose name matches this fnmatch pattern")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--substitute-backend", choices=["torch", *KERNEL_BACKENDS],
                        help="run every case on this backend instead of its own (with 'torch' on the "
                             "CPU: a check of the cases themselves)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--report", type=Path, help="also write the results as a markdown table here")
    return parser.parse_args(argv)


def selected_cases(backends, pattern) -> list[Case]:
    return [c for c in all_cases() if c.backend in backends and fnmatch.fnmatchcase(c.name, pattern)]


def main(argv=None) -> int:
    args = _parse_args(argv)
    cases = selected_cases(args.backends, args.match)
    if args.list:
        for case in cases:
            print(case.name)
        print(f"{len(cases)} cases")
        return 0 if cases else 1
    if not cases:
        print(f"kernel_cases: no case matches {args.match!r} for {args.backends}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernel_cases: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    # Under compute-sanitizer the caching allocator is off (each tensor its own allocation).
    poison = device.type == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") in ("", "0")

    rows, failed = [], 0
    for case in cases:
        backend = args.substitute_backend or case.backend
        path = ""
        try:
            if poison:
                _poison_cached_memory(device)
            outputs = case.run(backend, device)
            ok, errors = check_outputs(outputs, case.tolerance)
            detail = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            if case.op == "attention_pool":
                kw = case.run.keywords
                path = _internal_pool_path(case.backend, kw["dtype"], kw["heads"], BATCH, kw["seq_len"], device)
        except Exception as exc:  # one broken case must not hide the others
            traceback.print_exc()
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed += not ok
        status = "ok" if ok else "FAIL"
        print(f"{status:4} {case.name:52} {path:24} {detail}", flush=True)
        rows.append((case.name, backend, path, f"{case.tolerance:.0e}", detail, status))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    summary = f"{len(cases) - failed} of {len(cases)} cases match the float64 torch reference"
    print(summary)
    if args.report:
        lines = [f"{summary} (relative errors; tolerance per case)", "",
                 "| case | ran on | forward: variant, n_split | tolerance | relative error | result |",
                 "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        args.report.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
