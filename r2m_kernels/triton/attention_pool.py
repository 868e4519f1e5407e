"""Triton attention pool (docs/design.md §2): one pass over `hidden` forward, one pass backward.

    pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t]      over valid t

Layouts (pool_layout.py): padded hidden (B, S, D_p) with an optional (B, S) mask of any
pattern, or packed hidden (N, D_p) with (B+1,) int32 cu_seqlens. hidden fp32/fp16/bf16 (or
fp64), q of any float dtype (B, n_h, D_p); every score, softmax and accumulation is fp32
(fp64 for fp64 hidden, as in the torch backend).

Two variants behind one op. With n_h >= attention_pool_many_heads.MANY_HEADS_MIN (and
16/32-bit hidden) the ops call the many-head variant (attention_pool_many_heads.py):
tensor-core dots over all heads, 2 passes over hidden forward and 2 backward whatever n_h.
Otherwise the per-head kernels below, which do the products on the CUDA cores; the wrapper
hands them scale * q in the accumulation dtype.

Kernel plan. A program owns one sequence (and, forward, one head) and a contiguous chunk of
its positions. It walks the chunk BLOCK_S rows at a time; each row-block of hidden is loaded
once, whole over D_p (BLOCK_D = next power of two >= D_p, D_p <= MAX_D_P), and kept in
registers for both the score (a dot product over D_p on the CUDA cores) and the accumulation.

  forward   grid (B * n_h, n_split). Online softmax (running max and sum in fp32) over the
            chunk; writes the chunk's normalised partial output and log-sum-exp. With
            n_split = 1 that is the result; otherwise (flash-decoding, chosen when B * n_h
            programs cannot fill the GPU) the partials are combined by their log-sum-exp.
            Passes over hidden: 1 for n_h = 1. For n_h > 1 the heads of one sequence are
            adjacent programs that read the same rows at the same time, so the extra reads
            mostly hit L2 (n_h reads from L2, ~1 from HBM).
  backward  grid (B * n_h, n_split) for dq alone, like the forward. When hidden needs a
            gradient, grid (B, n_split) and the program loops over the heads, so it alone
            owns its rows of dhidden and sums the heads there without atomics:
                a_t = exp(scale q.h_t - lse),  delta_t = dp . h_t,  D = dp . pooled
                ds_t = a_t (delta_t - D),  dq = scale sum_t ds_t h_t,
                dh_t = sum_j (scale ds_tj q_j + a_tj dp_j)      (only if hidden needs grad)
            Passes over hidden: 1 for n_h = 1; for n_h > 1 as the forward (mostly L2) for
            dq alone, n_h passes from HBM with dhidden (below MANY_HEADS_MIN heads).

The op is a torch.library custom op (custom_ops.define_attention_pool_op: fake
implementation and autograd), so torch.compile traces through it without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch, splits
from ..custom_ops import define_attention_pool_op
from ..precision import accumulation_dtype
from . import attention_pool_many_heads as many_heads
from . import common, pool_layout
from .common import INTERPRET, TL_ACC, join_scalar, split_scalar
from .pool_layout import chunk, load_rows, sequence, valid_rows

# The per-head kernels hold a row-block of hidden whole over D_p in registers; 16384 covers
# every current LLM width (Llama-3.1-405B). The many-head variant tiles D_p, but the variant
# is chosen by n_h alone, so the limit applies to both.
MAX_D_P = 16384
# Row-block elements (BLOCK_S * BLOCK_D / threads) one thread holds, in fp32, without spilling
# to local memory: ptxas for sm_90 (tests/support/triton_compile.py) kept every tile up to 64 per thread
# spill-free at 4 and 8 warps and spilled above. (16 warps, which cap a thread at 128 registers,
# spilled from 32 per thread and are not candidates.) fp64 math holds half as many.
_TILE_PER_THREAD = {4: 64, 8: 64}
# The backward that loops over several heads into dhidden spilled from 32 per thread.
_TILE_PER_THREAD_HEADS_LOOP = 16
# Local-memory spill (bytes stored + loaded, ptxas for sm_90) the backward kernel may have: a
# few registers' worth, in small tiles the rule above keeps (BLOCK_S 8 with 4 warps at some
# D_p; fp64 with several heads into dhidden). The same tiles at other D_p do not spill, so a
# rule that dropped them would drop those too; the autotuner measures them against their
# neighbours instead.
BWD_SPILL_BYTES = 24
# Fewest row-block elements per program: smaller tiles leave a warp nothing to load.
_MIN_TILE = 1024


def _configs():
    # The interpreter cannot autotune over more than one config.
    if INTERPRET:
        return [triton.Config({"BLOCK_S": 4}, num_warps=1)]
    return [triton.Config({"BLOCK_S": bs}, num_warps=w)
            for bs in (1, 2, 4, 8, 16, 32) for w in (4, 8)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles that would spill registers and, where larger ones fit, tiles so small that a
    warp has nothing to load."""
    args = {**named_args, **kwargs}
    words = args["ACC"].primitive_bitwidth // 32  # registers per accumulated element

    def per_thread(c):
        return c.kwargs["BLOCK_S"] * args["BLOCK_D"] * words / (32 * c.num_warps)

    def limit(c):
        # A program that loops over several heads into dhidden keeps more alive per row-block.
        several_heads = args.get("NEED_DH") and args["HEADS_PER_PROGRAM"] > 1
        return min(_TILE_PER_THREAD[c.num_warps], _TILE_PER_THREAD_HEADS_LOOP) if several_heads \
            else _TILE_PER_THREAD[c.num_warps]

    fits = [c for c in configs if per_thread(c) <= limit(c)]
    big_enough = [c for c in fits if c.kwargs["BLOCK_S"] * args["BLOCK_D"] >= _MIN_TILE]
    return big_enough or fits or configs[:1]


def _autotune(fn):
    return triton.autotune(configs=_configs(), key=["D", "N_HEADS"],
                           prune_configs_by={"early_config_prune": _prune})(fn)


@_autotune
@triton.jit
def _pool_fwd_kernel(
    hidden, q_scaled, cu_seqlens, mask, out, lse,
    S, D, N_HEADS,
    stride_hb, stride_hs, stride_hd,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_ms,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out (n_split, B, n_h, D) partial outputs and lse (n_split, B, n_h) of each split
    (contiguous); a split without a valid position gets 0 and -inf."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = pid // N_HEADS
    j = pid % N_HEADS
    _, seqlen, base = sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = chunk(seqlen, split, n_split, BLOCK_S)

    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q_ptrs = q_scaled + b.to(tl.int64) * stride_qb + j * stride_qh + offs_d * stride_qd
    qj = tl.load(q_ptrs, mask=in_d, other=0.0)

    # Running max starts at -inf; m_safe keeps exp() finite while nothing valid has been seen.
    m = tl.full([], float("-inf"), ACC)
    denom = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK)
        rows = load_rows(base, valid, offs_s, offs_d, D, stride_hs, stride_hd).to(ACC)
        scores = tl.where(valid, tl.sum(rows * qj[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        weights = tl.exp(scores - m_safe)
        denom = denom * rescale + tl.sum(weights, axis=0)
        acc = acc * rescale + tl.sum(weights[:, None] * rows, axis=0)
        m = m_new

    nonempty = denom > 0
    denom_safe = tl.where(nonempty, denom, 1.0)
    slot = (split * tl.num_programs(0) + pid).to(tl.int64)  # = (split, b, j) in (n_split, B, n_h)
    tl.store(out + slot * D + offs_d, acc / denom_safe, mask=in_d)
    tl.store(lse + slot, tl.where(nonempty, m + tl.log(denom_safe), float("-inf")))


@_autotune
@triton.jit
def _pool_bwd_kernel(
    hidden, q_scaled, cu_seqlens, mask, grad, lse, delta, dq, dhidden,
    S, D, N_HEADS, HEADS_PER_PROGRAM, scale_hi, scale_lo,
    stride_hb, stride_hs, stride_hd,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_ms,
    stride_gb, stride_gh, stride_gd,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DH: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dq (n_split, B, n_h, D) partial sums of scale * ds_t h_t of each split (contiguous; scale =
    scale_hi + scale_lo); dhidden, when NEED_DH, contiguous with hidden's row layout, every
    row of the split written (zeros at invalid positions). lse and delta = grad . pooled are
    (B, n_h), contiguous; dq, lse, delta in the accumulation dtype ACC.
    A program handles heads [j0, j0 + HEADS_PER_PROGRAM) of one sequence: all of them when
    NEED_DH (it owns its rows of dhidden), else one.

    Spills: a few small tiles that the register rule keeps spill a few registers, up to
    BWD_SPILL_BYTES."""
    scale = join_scalar(scale_hi, scale_lo, ACC)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    head_groups = N_HEADS // HEADS_PER_PROGRAM
    b = pid // head_groups
    j0 = (pid % head_groups) * HEADS_PER_PROGRAM
    n_split = tl.num_programs(1)
    row0, seqlen, base = sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = chunk(seqlen, split, n_split, BLOCK_S)

    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    for j in range(j0, j0 + HEADS_PER_PROGRAM):
        q_ptrs = q_scaled + b.to(tl.int64) * stride_qb + j * stride_qh + offs_d * stride_qd
        qj = tl.load(q_ptrs, mask=in_d, other=0.0)
        g_ptrs = grad + b.to(tl.int64) * stride_gb + j * stride_gh + offs_d * stride_gd
        grad_j = tl.load(g_ptrs, mask=in_d, other=0.0).to(ACC)
        lse_j = tl.load(lse + b * N_HEADS + j)
        delta_j = tl.load(delta + b * N_HEADS + j)
        dq_acc = tl.zeros([BLOCK_D], ACC)
        for s0 in range(start, stop, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid = valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK)
            rows = load_rows(base, valid, offs_s, offs_d, D, stride_hs, stride_hd).to(ACC)
            scores = tl.sum(rows * qj[None, :], axis=1)
            attn = tl.exp(tl.where(valid, scores - lse_j, float("-inf")))
            dscores = attn * (tl.sum(rows * grad_j[None, :], axis=1) - delta_j)
            # dq takes scale * ds: unscaled, sum_t ds_t h_t could overflow where dq does not.
            dq_acc += tl.sum((dscores * scale)[:, None] * rows, axis=0)
            if NEED_DH:
                # This program owns these rows: the first head writes them, later heads add.
                dh = dscores[:, None] * qj[None, :] + attn[:, None] * grad_j[None, :]
                dh_ptrs = dhidden + (row0 + offs_s[:, None]) * D + offs_d[None, :]
                in_rows = (offs_s[:, None] < stop) & in_d[None, :]
                dh += tl.load(dh_ptrs, mask=in_rows & (j > 0), other=0.0).to(ACC)
                tl.store(dh_ptrs, dh, mask=in_rows)
        # (split, b, j) in (n_split, B, n_h); the grid's first axis spans B * n_h / HEADS_PER_PROGRAM.
        slot = (split * tl.num_programs(0) * HEADS_PER_PROGRAM + b * N_HEADS + j).to(tl.int64)
        tl.store(dq + slot * D + offs_d, dq_acc, mask=in_d)


def why_not_inputs(inputs) -> str | None:
    """None when these kernels take the validated attention_pool inputs, else the reason."""
    d_p = inputs.hidden.shape[-1]
    if d_p > MAX_D_P:
        return f"the Triton attention pool takes D_p <= {MAX_D_P}, got D_p = {d_p}"
    return None


def _forward(hidden, q, scale, mask, cu_seqlens):
    """(pooled (B, n_h, D_p) and lse (B, n_h), the log-sum-exp of the scores, both in the
    accumulation dtype)."""
    if many_heads.uses_many_heads(hidden, q.shape[1]):
        return many_heads.pool_forward(hidden, q, scale, mask, cu_seqlens)
    lay = pool_layout.layout(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    batch, heads, d_p = lay.batch, q.shape[1], hidden.shape[-1]
    n_split = splits.num_splits(batch * heads, lay.typical, hidden.device)
    # With one split the kernel's normalised output is the result: it writes it directly.
    direct = n_split == 1
    split_dims = () if direct else (n_split,)
    out = pool_layout.empty(split_dims + (batch, heads, d_p), acc, hidden.device)
    lse = pool_layout.empty(split_dims + (batch, heads), acc, hidden.device)
    q_scaled = q.to(acc) * scale
    _pool_fwd_kernel[(batch * heads, n_split)](
        hidden, q_scaled, lay.cu_seqlens, lay.mask, out, lse,
        lay.seq_len, d_p, heads,
        lay.stride_hb, hidden.stride(-2), hidden.stride(-1),
        q_scaled.stride(0), q_scaled.stride(1), q_scaled.stride(2),
        lay.stride_mb, lay.stride_ms,
        PACKED=lay.packed, HAS_MASK=mask is not None, ACC=TL_ACC[acc],
        BLOCK_D=triton.next_power_of_2(d_p),
    )
    if direct:
        return out, lse
    return splits.combine_splits(out, lse, acc)


def _backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden):
    """(dq in q.dtype, dhidden in hidden.dtype and shape; an empty tensor when not needed)."""
    if many_heads.uses_many_heads(hidden, q.shape[1]):
        return many_heads.pool_backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens,
                                        need_dhidden)
    lay = pool_layout.layout(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    batch, heads, d_p = lay.batch, q.shape[1], hidden.shape[-1]
    heads_per_program = heads if need_dhidden else 1
    programs = batch * heads // heads_per_program
    n_split = splits.num_splits(programs, lay.typical, hidden.device)
    delta = (grad.to(acc) * pooled.to(acc)).sum(dim=-1).contiguous()  # D_j = dp_j . p_j
    q_scaled = q.to(acc) * scale
    dq = pool_layout.empty((n_split, batch, heads, d_p), acc, hidden.device)
    if need_dhidden:
        # Heads are summed in place; with one head the kernel writes the result directly.
        dh_dtype = hidden.dtype if heads == 1 else acc
        dhidden = pool_layout.empty(hidden.shape, dh_dtype, hidden.device)
    else:
        dhidden = hidden.new_empty(0)
    _pool_bwd_kernel[(programs, n_split)](
        hidden, q_scaled, lay.cu_seqlens, lay.mask, grad, lse.contiguous(), delta, dq,
        dhidden, lay.seq_len, d_p, heads, heads_per_program, *split_scalar(scale),
        lay.stride_hb, hidden.stride(-2), hidden.stride(-1),
        q_scaled.stride(0), q_scaled.stride(1), q_scaled.stride(2),
        lay.stride_mb, lay.stride_ms,
        grad.stride(0), grad.stride(1), grad.stride(2),
        PACKED=lay.packed, HAS_MASK=mask is not None, NEED_DH=need_dhidden, ACC=TL_ACC[acc],
        BLOCK_D=triton.next_power_of_2(d_p),
    )
    return dq.sum(dim=0).to(q.dtype), dhidden.to(hidden.dtype)


_pool_op = define_attention_pool_op("attention_pool_triton", _forward, _backward)


def attention_pool_triton(hidden, q, scale, mask=None, cu_seqlens=None):
    """The `triton` backend of attention_pool (inputs already validated).

    hidden (B, S, D_p) [+ mask (B, S)] or (N, D_p) + cu_seqlens (B+1,) int32, fp16/bf16/fp32
    (fp64 works, at fp64 speed), D_p <= MAX_D_P; q (B, n_h, D_p) of any float dtype. Returns pooled (B, n_h, D_p) in hidden.dtype;
    differentiable in q and hidden.
    """
    return _pool_op(hidden, q, float(scale), mask, cu_seqlens)[0].to(hidden.dtype)


dispatch.register("attention_pool", "triton", attention_pool_triton, common.why_not_device, why_not_inputs)
