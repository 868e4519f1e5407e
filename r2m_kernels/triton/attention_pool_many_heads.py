"""The many-head variant of the Triton attention pool (docs/design.md §2.4): tensor-core dots
over all heads at once.

    pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t]      over valid t

attention_pool.py's custom ops call this variant for n_h >= MANY_HEADS_MIN (uses_many_heads);
same layouts (pool_layout.py), same results and saved state: pooled (B, n_h, D_p) in hidden's
dtype, lse (B, n_h) fp32. With many heads the per-head variant re-reads hidden once per head
(CUDA-core dot products; with dhidden, n_h passes from HBM) and an (n_h, D_p) accumulator
no longer fits in registers, so this variant makes a score pass and a pooling pass and does
both products as matrix products on the tensor cores.

Passes over hidden: forward 2, backward 2 (dq and dhidden together), for any n_h; the
per-head variant makes 1 pass per head forward (L2 absorbs most) and n_h with dhidden.

Kernel plan (the head block BLOCK_H = max(16, next_pow2(n_h)), padded heads masked; tl.dot
needs every dimension >= 16 on NVIDIA, so BLOCK_S, BLOCK_D >= 16 too). Score-like tiles are
(BLOCK_S, BLOCK_H), positions by heads, so that the long dimension is the dots' M.

  forward   1. _scores_kernel, grid (B, n_split): a program walks its chunk of one sequence
               BLOCK_S rows at a time; scores = rows @ q^T accumulated over D_p in BLOCK_D
               chunks (tl.dot), times scale, -inf at invalid positions, stored to an fp32
               (n_h, rows) buffer; an online max/sum over the chunk gives each (split, b, j)
               its log-sum-exp. The host combines those with torch.logsumexp over the splits
               (a (n_split, B, n_h) tensor): the lse comes out of the pass that makes the
               scores, with no second read of the buffer and no segmented reduction for
               packed sequences.
            2. _weighted_rows_kernel (SOFTMAX), grid (B * cdiv(D_p, BLOCK_D), n_split): a
               program owns one sequence's (BLOCK_D, BLOCK_H) slice of pooled^T and walks its
               chunk: += rows^T @ w with w = exp(scores - lse) (in [0, 1], rounded to hidden's
               dtype for the dot, as the torch backend rounds its weights), and sums w. The
               lse is global, so splits need no rescaling: the host adds their partial sums.
               The result is divided by sum_t w (~1 up to the rounding of an fp32 lse, ~4e-6
               at |lse| ~ 100) so that pooled is normalised exactly: the backward's
               delta = grad . pooled cancels against sum_t a_t dP_t, and a pooled off by that
               factor shows in dq (test_scores_far_below_exp_range). The D-blocks of a
               sequence are adjacent programs: the score tiles they share come from L2.
  backward  A. _dscores_kernel, grid (B, n_split): delta_j = grad_j . pooled_j first (n_h x
               D_p, no pass over hidden); then per row-block scores = rows @ q^T and
               dP = rows @ grad^T (two dots sharing the loaded tile), a = exp(scores - lse),
               ds = scale * a * (dP - delta) stored to an fp32 (n_h, rows) buffer. When
               hidden needs a gradient the same program then writes its rows of
               dhidden = ds @ q + a @ grad (tl.dot, tiled over D_p, reading only q and grad):
               fused here because ds and a are already in registers, so no (n_h, rows)
               buffer for a and no extra launch; every row has one owner, so no atomics.
            B. _weighted_rows_kernel (raw weights): dq = ds^T @ rows, as the forward's pass 2.

Dots run in hidden's dtype with fp32 accumulation: 16-bit q, grad, softmax weights and ds
are rounded to hidden's dtype for them, as the torch backend rounds its matmul operands. fp32
hidden uses IEEE fp32 dots (input_precision="ieee"): TF32 would round the operands to 10-bit
mantissas, ~1e-3 relative, far outside the fp32 tolerance (~1e-5). fp64 hidden stays on the
per-head variant (fp64 has no tensor-core path worth a second variant).

Peak extra memory (beyond inputs and outputs), fp32 buffers, rows = B * S padded or N packed:
    forward   4 n_h rows (scores) + 4 n_split B n_h (lse parts)
              [+ 4 n_split B n_h (D_p + 1) pooled partials and their sums when the pooling
              pass splits]
    backward  4 n_h rows (ds) [+ 4 n_split B n_h D_p dq partials when it splits]
The forward's buffer is freed before the backward runs. At the `heads` size (B 512, S 1024,
n_h 16, D_p 4096): 4 * 16 * 524288 B = 32 MiB (+ 32 KiB of lse parts); neither weighted pass
splits there (512 * 32 programs), so the peak is 32 MiB, under the 64 MiB target.

MANY_HEADS_MIN: the fewest heads for which this variant runs. The estimate behind it, H100
bf16: the per-head variant streams hidden from HBM once (3.2 TB/s) and n_h times from L2
(roughly 7 TB/s), and spends ~2 CUDA-core FMAs per element per head (~34 T FMA/s), so it
keeps up with HBM only to n_h ~ 2-4 forward and, with dhidden, reads HBM n_h times; this
variant costs 2 passes either way. benchmarks/pool_variants.py measures the crossover
(benchmarks/RESULTS.md). `forced_variant` makes every call in its scope take one variant, so
tests and the benchmark can run both at any n_h without touching the threshold.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

from .. import splits
from . import pool_layout
from .common import INTERPRET
from .pool_layout import chunk, load_rows, sequence, valid_rows

# Fewest heads for which attention_pool uses this variant (see the docstring).
MANY_HEADS_MIN = 4

# Hidden dtypes this variant takes, and the dtype of its dot operands.
DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Columns of pooled (or dq) per program in the weighted passes, by operand dtype. Fixed rather
# than autotuned because the grid, and so the number of flash-decoding splits and the partial
# buffers, depend on it. fp32 operands take the FMA path (IEEE dots), whose operands live in
# registers: a narrower block.
_WEIGHTED_BLOCK_D = {tl.float16: 128, tl.bfloat16: 128, tl.float32: 64}
# The interpreter's one config: small blocks, so the tests cross several row-blocks and
# D-blocks (the weighted passes' BLOCK_D too).
_INTERPRETER_BLOCKS = {"BLOCK_S": 16, "BLOCK_D": 32}

# Autotune candidates, by operand bits: (BLOCK_S, BLOCK_D, num_warps, num_stages) of the
# row-block kernels, (BLOCK_S, num_warps, num_stages) of the weighted ones. Every 16-bit
# candidate compiles for sm_90 without register spills at n_h 12, 16 and 32
# (tests/support/triton_compile.py); (32, 64, 4, 4) for 16-bit operands and every fp32 tile
# but the one kept spilled 16-524 bytes there, and that fp32 tile spills up to
# DSCORES_SPILL_BYTES in the dscores kernel. fp32 operands take the FMA path (IEEE dots), whose operands live in registers: one
# small tile each.
_ROW_BLOCKS = {16: ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
               32: ((64, 64, 8, 3),)}
_WEIGHTED = {16: ((32, 4, 4), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 3)),
             32: ((32, 8, 3),)}
# Local-memory spill (bytes stored + loaded, ptxas for sm_90) the dscores kernel may have: its
# one fp32 tile spills a little at 16 heads, and every other fp32 tile tried spilled more.
# fp32 hidden states with many heads are a correctness path, not the tuned one, so the tile
# that spills least stays.
DSCORES_SPILL_BYTES = 56


# The two variants of the triton attention pool: one program per (sequence, head) with CUDA-core
# dots (attention_pool.py), and this file's tensor-core dots over all heads.
VARIANTS = ("per-head", "many-heads")
_forced = contextvars.ContextVar("r2m_forced_pool_variant", default=None)


@contextlib.contextmanager
def forced_variant(variant: str):
    """Within this scope the triton attention pool takes `variant` (one of VARIANTS) at every
    n_h, instead of choosing by MANY_HEADS_MIN; "many-heads" still needs a DOT_DTYPES hidden."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    token = _forced.set(variant)
    try:
        yield
    finally:
        _forced.reset(token)


def uses_many_heads(hidden: torch.Tensor, heads: int) -> bool:
    """Whether attention_pool's triton ops take this variant for hidden and n_h = heads."""
    if hidden.dtype not in DOT_DTYPES:
        return False
    forced = _forced.get()
    if forced is not None:
        return forced == "many-heads"
    return heads >= MANY_HEADS_MIN


def _configs(table, names):
    """triton.Configs of `table` (operand bits -> rows of names' values, then num_warps and
    num_stages), each tagged with its operand width for the prune; one config when
    interpreting (the interpreter cannot autotune over more)."""
    if INTERPRET:
        return [triton.Config({n: _INTERPRETER_BLOCKS[n] for n in names}, num_warps=1)]
    configs = []
    for bits, rows in table.items():
        for row in rows:
            config = triton.Config(dict(zip(names, row)), num_warps=row[-2], num_stages=row[-1])
            config.operand_bits = bits
            configs.append(config)
    return configs


def _prune(configs, named_args, **kwargs):
    """Keep the candidates for the operand width and, for row blocks, no D chunk wider than
    D_p needs (all-masked columns)."""
    bits = kwargs["DOT"].primitive_bitwidth
    kept = [c for c in configs if getattr(c, "operand_bits", bits) == bits]
    widest = max(16, triton.next_power_of_2(named_args["D"]))
    return [c for c in kept if c.kwargs.get("BLOCK_D", 0) <= widest] or kept[:1]


# Every kernel here only stores (no read-modify-write of its outputs), so the autotuner's
# repeated launches leave the same results.
def _autotune_row_blocks(*key):
    return triton.autotune(configs=_configs(_ROW_BLOCKS, ("BLOCK_S", "BLOCK_D")),
                           key=["D", "BLOCK_H", "DOT", *key],
                           prune_configs_by={"early_config_prune": _prune})


_autotune_weighted = triton.autotune(configs=_configs(_WEIGHTED, ("BLOCK_S",)),
                                     key=["D", "BLOCK_H", "BLOCK_D", "DOT", "SOFTMAX"],
                                     prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _head_tile(ptr, b, offs_h, offs_d, N_HEADS, D, stride_b, stride_h, stride_d):
    """(BLOCK_H, BLOCK_D) tile of a (B, n_h, D_p) tensor at sequence b, zero past n_h and D_p."""
    ptrs = ptr + b.to(tl.int64) * stride_b + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs_h[:, None] < N_HEADS) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _row_block_dots(base, valid, offs_s, b, offs_h, D, N_HEADS, q, grad,
                    stride_hs, stride_hd, stride_qb, stride_qh, stride_qd,
                    stride_gb, stride_gh, stride_gd, WITH_GRAD: tl.constexpr, DOT: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """(rows @ q^T, rows @ grad^T), each (BLOCK_S, BLOCK_H) fp32, for one row-block, reading
    its rows once in BLOCK_D chunks. Without WITH_GRAD the second is zeros."""
    dots = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    dgrad = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        rows = load_rows(base, valid, offs_s, offs_d, D, stride_hs, stride_hd).to(DOT)
        q_tile = _head_tile(q, b, offs_h, offs_d, N_HEADS, D, stride_qb, stride_qh, stride_qd).to(DOT)
        dots = tl.dot(rows, tl.trans(q_tile), dots, input_precision=PRECISION)
        if WITH_GRAD:
            g_tile = _head_tile(grad, b, offs_h, offs_d, N_HEADS, D, stride_gb, stride_gh, stride_gd).to(DOT)
            dgrad = tl.dot(rows, tl.trans(g_tile), dgrad, input_precision=PRECISION)
    return dots, dgrad


@_autotune_row_blocks()
@triton.jit
def _scores_kernel(
    hidden, q, cu_seqlens, mask, scores, lse_parts,
    S, D, N_HEADS, ROWS, scale,
    stride_hb, stride_hs, stride_hd,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_ms,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scores (n_h, ROWS) fp32: scale * q_j . h_t at every position of the program's chunk
    (-inf where invalid); lse_parts (n_split, B, n_h) fp32: the log-sum-exp of each split's
    scores (-inf for a split without a valid position)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    row0, seqlen, base = sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = chunk(seqlen, split, tl.num_programs(1), BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    in_h = offs_h < N_HEADS

    # Running max starts at -inf; m_safe keeps exp() finite while nothing valid has been seen.
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK)
        dots, _ = _row_block_dots(base, valid, offs_s, b, offs_h, D, N_HEADS, q, q,
                                  stride_hs, stride_hd, stride_qb, stride_qh, stride_qd,
                                  stride_qb, stride_qh, stride_qd, False, DOT, PRECISION,
                                  BLOCK_S, BLOCK_H, BLOCK_D)
        s = tl.where(valid[:, None] & in_h[None, :], dots * scale, float("-inf"))
        ptrs = scores + offs_h[None, :].to(tl.int64) * ROWS + (row0 + offs_s[:, None])
        tl.store(ptrs, s, mask=(offs_s[:, None] < stop) & in_h[None, :])
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        denom = denom * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[None, :]), axis=0)
        m = m_new

    nonempty = denom > 0
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, denom, 1.0)), float("-inf"))
    slot = (split * tl.num_programs(0) + b).to(tl.int64) * N_HEADS  # (split, b) in (n_split, B, n_h)
    tl.store(lse_parts + slot + offs_h, lse, mask=in_h)


@_autotune_weighted
@triton.jit
def _weighted_rows_kernel(
    weights, lse, hidden, cu_seqlens, mask, out, denoms,
    S, D, N_HEADS, ROWS,
    stride_hb, stride_hs, stride_hd,
    stride_mb, stride_ms,
    SOFTMAX: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[split, b, j, d] = sum_t w_jt h_td over the split's positions t of sequence b, with
    w = weights (n_h, ROWS) fp32, or when SOFTMAX w = exp(weights - lse[b]) (lse (B, n_h)
    fp32) and denoms[split, b, j] = sum_t w_jt. out is contiguous (n_split, B, n_h, D) fp32,
    or with one split (B, n_h, D) in the result's dtype, divided by the denominators there."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    b = pid // n_dblocks
    offs_d = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    row0, seqlen, base = sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = chunk(seqlen, split, tl.num_programs(1), BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    in_h = offs_h < N_HEADS
    if SOFTMAX:
        lse_b = tl.load(lse + b * N_HEADS + offs_h, mask=in_h, other=0.0)
        denom = tl.zeros([BLOCK_H], tl.float32)

    acc = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)  # out^T: D_p is the dot's long side
    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK)
        keep = valid[:, None] & in_h[None, :]
        ptrs = weights + offs_h[None, :].to(tl.int64) * ROWS + (row0 + offs_s[:, None])
        w = tl.load(ptrs, mask=keep, other=0.0)
        if SOFTMAX:
            # exp(-inf) = 0 off the valid positions; exp(0 - lse) there would be inf once
            # lse < -88, and inf times a zeroed row is NaN.
            w = tl.exp(tl.where(keep, w - lse_b[None, :], float("-inf")))
            denom += tl.sum(w, axis=0)
        rows = load_rows(base, valid, offs_s, offs_d, D, stride_hs, stride_hd).to(DOT)
        acc = tl.dot(tl.trans(rows), w.to(DOT), acc, input_precision=PRECISION)

    slot = (split * (tl.num_programs(0) // n_dblocks) + b).to(tl.int64) * N_HEADS
    if SOFTMAX:
        # Normalise by the weights' own sum: exp(-lse) is off by the rounding of an fp32 lse
        # (~4e-6 relative at |lse| ~ 100), and the backward's delta = grad . pooled must not
        # carry that factor (it cancels against sum_t a_t dP_t, both large).
        if tl.num_programs(1) == 1:
            acc = acc / tl.where(in_h, denom, 1.0)[None, :]
        elif pid % n_dblocks == 0:
            tl.store(denoms + slot + offs_h, denom, mask=in_h)
    out_ptrs = out + (slot + offs_h[None, :]) * D + offs_d[:, None]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(offs_d[:, None] < D) & in_h[None, :])


@_autotune_row_blocks("NEED_DH")
@triton.jit
def _dscores_kernel(
    hidden, q, grad, pooled, cu_seqlens, mask, lse, dscores, dhidden,
    S, D, N_HEADS, ROWS, scale,
    stride_hb, stride_hs, stride_hd,
    stride_qb, stride_qh, stride_qd,
    stride_gb, stride_gh, stride_gd,
    stride_pb, stride_ph, stride_pd,
    stride_mb, stride_ms,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DH: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dscores (n_h, ROWS) fp32: d loss / d (q_j . h_t) = scale a_jt (dP_jt - delta_j) at
    every position of the program's chunk (0 where invalid); when NEED_DH, dhidden, contiguous
    with hidden's row layout in its dtype: every row of the chunk, zeros at invalid rows.
    grad and pooled are (B, n_h, D_p); lse (B, n_h) fp32.

    Spills: fp32 operands (FMA dots, one tile) spill, up to DSCORES_SPILL_BYTES."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    row0, seqlen, base = sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = chunk(seqlen, split, tl.num_programs(1), BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    in_h = offs_h < N_HEADS
    lse_b = tl.load(lse + b * N_HEADS + offs_h, mask=in_h, other=0.0)

    # delta_j = grad_j . pooled_j = sum_t a_jt dP_jt, the softmax backward's row sum.
    delta = tl.zeros([BLOCK_H], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        g_tile = _head_tile(grad, b, offs_h, offs_d, N_HEADS, D, stride_gb, stride_gh, stride_gd)
        p_tile = _head_tile(pooled, b, offs_h, offs_d, N_HEADS, D, stride_pb, stride_ph, stride_pd)
        delta += tl.sum(g_tile.to(tl.float32) * p_tile.to(tl.float32), axis=1)

    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK)
        dots, dgrad = _row_block_dots(base, valid, offs_s, b, offs_h, D, N_HEADS, q, grad,
                                      stride_hs, stride_hd, stride_qb, stride_qh, stride_qd,
                                      stride_gb, stride_gh, stride_gd, True, DOT, PRECISION,
                                      BLOCK_S, BLOCK_H, BLOCK_D)
        keep = valid[:, None] & in_h[None, :]
        attn = tl.exp(tl.where(keep, dots * scale - lse_b[None, :], float("-inf")))
        ds = attn * (dgrad - delta[None, :]) * scale
        in_rows = offs_s < stop
        ptrs = dscores + offs_h[None, :].to(tl.int64) * ROWS + (row0 + offs_s[:, None])
        tl.store(ptrs, ds, mask=in_rows[:, None] & in_h[None, :])
        if NEED_DH:
            # dh_t = sum_j ds_jt q_j + a_jt grad_j: (BLOCK_S, BLOCK_H) @ (BLOCK_H, BLOCK_D).
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                q_tile = _head_tile(q, b, offs_h, offs_d, N_HEADS, D, stride_qb, stride_qh, stride_qd)
                g_tile = _head_tile(grad, b, offs_h, offs_d, N_HEADS, D, stride_gb, stride_gh, stride_gd)
                dh = tl.dot(ds.to(DOT), q_tile.to(DOT), input_precision=PRECISION)
                dh = tl.dot(attn.to(DOT), g_tile.to(DOT), dh, input_precision=PRECISION)
                dh_ptrs = dhidden + (row0 + offs_s[:, None]) * D + offs_d[None, :]
                tl.store(dh_ptrs, dh.to(dhidden.dtype.element_ty),
                         mask=in_rows[:, None] & (offs_d[None, :] < D))


def _dot_args(hidden: torch.Tensor, heads: int) -> dict:
    """The constexprs of the dots: operand dtype, fp32 precision, head block."""
    return dict(DOT=DOT_DTYPES[hidden.dtype],
                # "ieee" matters for fp32 operands only; 16-bit ones get the default spelled out.
                PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                BLOCK_H=max(16, triton.next_power_of_2(heads)))


def _weighted_rows(weights, lse, hidden, lay, heads, out_dtype):
    """(B, n_h, D_p) in out_dtype: sum_t w_jt h_t per sequence, with w = weights ((n_h, rows)
    fp32), or when lse is given the softmax, w = exp(weights - lse) over its sum."""
    batch, d_p = lay.batch, hidden.shape[-1]
    dots = _dot_args(hidden, heads)
    widest = _INTERPRETER_BLOCKS["BLOCK_D"] if INTERPRET else _WEIGHTED_BLOCK_D[dots["DOT"]]
    block_d = min(widest, max(16, triton.next_power_of_2(d_p)))
    programs = batch * triton.cdiv(d_p, block_d)
    n_split = splits.num_splits(programs, lay.typical, hidden.device)
    direct = n_split == 1  # one split: the kernel writes the result itself
    shape = (batch, heads, d_p) if direct else (n_split, batch, heads, d_p)
    out = pool_layout.empty(shape, out_dtype if direct else torch.float32, hidden.device)
    softmax = lse is not None
    split_sums = softmax and not direct
    denoms = pool_layout.empty((n_split, batch, heads), torch.float32, hidden.device) if split_sums else out
    _weighted_rows_kernel[(programs, n_split)](
        weights, lse if softmax else weights, hidden, lay.cu_seqlens, lay.mask, out, denoms,
        lay.seq_len, d_p, heads, lay.rows,
        lay.stride_hb, hidden.stride(-2), hidden.stride(-1),
        lay.stride_mb, lay.stride_ms,
        SOFTMAX=softmax, PACKED=lay.packed, HAS_MASK=lay.has_mask, BLOCK_D=block_d, **dots,
    )
    if direct:
        return out
    total = out.sum(dim=0)
    if softmax:
        total /= denoms.sum(dim=0)[..., None]
    return total.to(out_dtype)


def pool_forward(hidden, q, scale, mask, cu_seqlens):
    """attention_pool's forward for uses_many_heads inputs: (pooled (B, n_h, D_p), lse (B, n_h)),
    both fp32 (the backward's delta = grad . pooled needs pooled unrounded)."""
    lay = pool_layout.layout(hidden, mask, cu_seqlens)
    batch, heads, d_p = lay.batch, q.shape[1], hidden.shape[-1]
    n_split = splits.num_splits(batch, lay.typical, hidden.device)
    scores = pool_layout.empty((heads, lay.rows), torch.float32, hidden.device)
    lse_parts = pool_layout.empty((n_split, batch, heads), torch.float32, hidden.device)
    _scores_kernel[(batch, n_split)](
        hidden, q, lay.cu_seqlens, lay.mask, scores, lse_parts,
        lay.seq_len, d_p, heads, lay.rows, scale,
        lay.stride_hb, hidden.stride(-2), hidden.stride(-1),
        q.stride(0), q.stride(1), q.stride(2),
        lay.stride_mb, lay.stride_ms,
        PACKED=lay.packed, HAS_MASK=lay.has_mask, **_dot_args(hidden, heads),
    )
    lse = torch.logsumexp(lse_parts, dim=0)
    return _weighted_rows(scores, lse, hidden, lay, heads, torch.float32), lse


def pool_backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden):
    """attention_pool's backward for uses_many_heads inputs: (dq in q.dtype, dhidden in
    hidden's dtype and shape, or an empty tensor when not needed)."""
    lay = pool_layout.layout(hidden, mask, cu_seqlens)
    batch, heads, d_p = lay.batch, q.shape[1], hidden.shape[-1]
    n_split = splits.num_splits(batch, lay.typical, hidden.device)
    dscores = pool_layout.empty((heads, lay.rows), torch.float32, hidden.device)
    if need_dhidden:
        dhidden = pool_layout.empty(hidden.shape, hidden.dtype, hidden.device)
    else:
        dhidden = hidden.new_empty(0)
    _dscores_kernel[(batch, n_split)](
        hidden, q, grad, pooled, lay.cu_seqlens, lay.mask, lse.contiguous(), dscores,
        dhidden if need_dhidden else hidden,  # never written without NEED_DH
        lay.seq_len, d_p, heads, lay.rows, scale,
        lay.stride_hb, hidden.stride(-2), hidden.stride(-1),
        q.stride(0), q.stride(1), q.stride(2),
        grad.stride(0), grad.stride(1), grad.stride(2),
        pooled.stride(0), pooled.stride(1), pooled.stride(2),
        lay.stride_mb, lay.stride_ms,
        PACKED=lay.packed, HAS_MASK=lay.has_mask, NEED_DH=need_dhidden, **_dot_args(hidden, heads),
    )
    return _weighted_rows(dscores, None, hidden, lay, heads, q.dtype), dhidden
