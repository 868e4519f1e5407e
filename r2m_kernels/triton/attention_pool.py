"""Triton attention pool (DESIGN §2): one pass over `hidden` forward, one pass backward.

    pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t]      over valid t

Layouts: padded hidden (B, S, D_p) with an optional (B, S) mask of any pattern, or packed
hidden (N, D_p) with (B+1,) int32 cu_seqlens. hidden fp32/fp16/bf16 (or fp64), q of any
float dtype (B, n_h, D_p); every score, softmax and accumulation is fp32 (fp64 for fp64
hidden, as in the torch backend). The wrapper hands the kernels scale * q in that dtype.

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
            dq alone, n_h passes from HBM with dhidden.

Not done here: the many-head tensor-core variant (a score pass with tl.dot into a
(B, n_h, S) buffer, then a pooling pass tiled over D_p); see the module's owed work.

The op is registered with torch.library.custom_op (with a fake implementation and autograd),
so torch.compile traces through it without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..reference import accumulation_dtype
from . import INTERPRET, TL_ACC, why_not

# The row-block of hidden is held whole over D_p in registers; 16384 covers every current LLM
# width (Llama-3.1-405B). Wider D_p would need the D-tiled two-pass variant.
MAX_D_P = 16384
# Largest row-block tile (BLOCK_S * BLOCK_D elements) a program keeps in registers.
_MAX_TILE = 32768
# Each flash-decoding split gets at least this many positions, so splitting never makes the
# per-program work smaller than the combine it costs.
_MIN_ROWS_PER_SPLIT = 64



def _configs():
    # The interpreter cannot autotune over more than one config.
    if INTERPRET:
        return [triton.Config({"BLOCK_S": 4}, num_warps=1)]
    return [triton.Config({"BLOCK_S": bs}, num_warps=w)
            for bs in (1, 2, 4, 8, 16, 32) for w in (4, 8, 16)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles too large for registers and, where larger ones fit, tiles so small that a
    warp has nothing to load."""
    block_d = {**named_args, **kwargs}["BLOCK_D"]
    fits = [c for c in configs if c.kwargs["BLOCK_S"] * block_d <= _MAX_TILE]
    big_enough = [c for c in fits if c.kwargs["BLOCK_S"] * block_d >= 1024]
    return big_enough or fits


def _autotune(fn):
    return triton.autotune(configs=_configs(), key=["D", "N_HEADS"],
                           prune_configs_by={"early_config_prune": _prune})(fn)


@triton.jit
def _sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED: tl.constexpr):
    """(first row of sequence b counted in rows of hidden, its length, pointer to its row 0)."""
    if PACKED:
        row0 = tl.load(cu_seqlens + b).to(tl.int64)
        seqlen = tl.load(cu_seqlens + b + 1).to(tl.int64) - row0
        base = hidden + row0 * stride_hs
    else:
        row0 = b.to(tl.int64) * S
        seqlen = S
        base = hidden + b.to(tl.int64) * stride_hb
    return row0, seqlen, base


@triton.jit
def _chunk(seqlen, split, n_split, BLOCK_S: tl.constexpr):
    """Positions [start, stop) of this split: equal chunks, each a whole number of blocks."""
    chunk = tl.cdiv(tl.cdiv(seqlen, n_split), BLOCK_S) * BLOCK_S
    start = split * chunk
    return start, tl.minimum(start + chunk, seqlen)


@triton.jit
def _load_rows(base, mask, b, offs_s, stop, offs_d, D, stride_hs, stride_hd, stride_mb, stride_ms,
               HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_S, BLOCK_D) rows in the accumulation dtype of hidden (zero where not valid) and the (BLOCK_S,) validity."""
    valid = offs_s < stop
    if HAS_MASK:
        keep = tl.load(mask + b.to(tl.int64) * stride_mb + offs_s * stride_ms, mask=valid, other=0)
        valid = valid & (keep != 0)
    ptrs = base + offs_s[:, None].to(tl.int64) * stride_hs + offs_d[None, :] * stride_hd
    rows = tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    return rows.to(ACC), valid


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
    _, seqlen, base = _sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = _chunk(seqlen, split, n_split, BLOCK_S)

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
        rows, valid = _load_rows(base, mask, b, offs_s, stop, offs_d, D, stride_hs, stride_hd,
                                 stride_mb, stride_ms, HAS_MASK, ACC)
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
    S, D, N_HEADS, HEADS_PER_PROGRAM,
    stride_hb, stride_hs, stride_hd,
    stride_qb, stride_qh, stride_qd,
    stride_mb, stride_ms,
    stride_gb, stride_gh, stride_gd,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DH: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dq (n_split, B, n_h, D) partial sums of ds_t h_t of each split (contiguous; the caller
    multiplies by scale); dhidden, when NEED_DH, contiguous with hidden's row layout, every
    row of the split written (zeros at invalid positions). lse and delta = grad . pooled are
    (B, n_h), contiguous; dq, lse, delta in the accumulation dtype ACC.
    A program handles heads [j0, j0 + HEADS_PER_PROGRAM) of one sequence: all of them when
    NEED_DH (it owns its rows of dhidden), else one."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    head_groups = N_HEADS // HEADS_PER_PROGRAM
    b = pid // head_groups
    j0 = (pid % head_groups) * HEADS_PER_PROGRAM
    n_split = tl.num_programs(1)
    row0, seqlen, base = _sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED)
    start, stop = _chunk(seqlen, split, n_split, BLOCK_S)

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
            rows, valid = _load_rows(base, mask, b, offs_s, stop, offs_d, D, stride_hs, stride_hd,
                                     stride_mb, stride_ms, HAS_MASK, ACC)
            scores = tl.sum(rows * qj[None, :], axis=1)
            attn = tl.where(valid, tl.exp(scores - lse_j), 0.0)
            dscores = attn * (tl.sum(rows * grad_j[None, :], axis=1) - delta_j)
            dq_acc += tl.sum(dscores[:, None] * rows, axis=0)
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


def _empty(shape, dtype, device):
    """Allocation of every buffer the kernels write in full (tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_splits(programs: int, seq_len: int, device: torch.device) -> int:
    """Flash-decoding splits of each sequence: enough programs for about two waves of the
    GPU, never chunks shorter than _MIN_ROWS_PER_SPLIT positions. In the interpreter a
    pretend 2-SM device, so that the tests run the split path at small batch sizes."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    wanted = triton.cdiv(2 * sms, programs)
    return max(1, min(wanted, triton.cdiv(seq_len, _MIN_ROWS_PER_SPLIT)))


def _layout(hidden, mask, cu_seqlens):
    """Kernel arguments shared by both directions: (B, S or 0, layout constexprs, the mask as
    uint8 (or a dummy), its strides, cu_seqlens (or a dummy), hidden's batch stride, a
    typical sequence length for choosing splits)."""
    packed = cu_seqlens is not None
    if packed:
        batch, seq_len, stride_hb = cu_seqlens.shape[0] - 1, 0, 0
        typical = triton.cdiv(hidden.shape[0], batch)
    else:
        batch, seq_len, stride_hb = hidden.shape[0], hidden.shape[1], hidden.stride(0)
        typical = seq_len
    if mask is not None:
        mask = (mask != 0).view(torch.uint8)
        mask_args = (mask, mask.stride(0), mask.stride(1))
    else:
        mask_args = (hidden, 0, 0)  # never read: HAS_MASK is False
    return dict(batch=batch, seq_len=seq_len, packed=packed, mask_args=mask_args,
                cu_seqlens=cu_seqlens if packed else hidden, stride_hb=stride_hb, typical=typical)


def _check_supported(hidden: torch.Tensor) -> None:
    if hidden.shape[-1] > MAX_D_P:
        raise ValueError(f"the triton backend of attention_pool supports D_p <= {MAX_D_P}, got "
                         f"hidden with D_p = {hidden.shape[-1]} (use backend='torch')")


@torch.library.custom_op("r2m::attention_pool_triton", mutates_args=())
def _pool_forward(hidden: torch.Tensor, q: torch.Tensor, scale: float, mask: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, n_h, D_p) in hidden.dtype, lse (B, n_h) log-sum-exp of the scores in the
    accumulation dtype)."""
    lay = _layout(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    batch, heads, d_p = lay["batch"], q.shape[1], hidden.shape[-1]
    n_split = _num_splits(batch * heads, lay["typical"], hidden.device)
    # With one split the kernel's normalised output is the result: it writes it directly.
    direct = n_split == 1
    splits = () if direct else (n_split,)
    out = _empty(splits + (batch, heads, d_p), hidden.dtype if direct else acc, hidden.device)
    lse = _empty(splits + (batch, heads), acc, hidden.device)
    q_scaled = q.to(acc) * scale
    _pool_fwd_kernel[(batch * heads, n_split)](
        hidden, q_scaled, lay["cu_seqlens"], lay["mask_args"][0], out, lse,
        lay["seq_len"], d_p, heads,
        lay["stride_hb"], hidden.stride(-2), hidden.stride(-1),
        q_scaled.stride(0), q_scaled.stride(1), q_scaled.stride(2),
        lay["mask_args"][1], lay["mask_args"][2],
        PACKED=lay["packed"], HAS_MASK=mask is not None, ACC=TL_ACC[acc],
        BLOCK_D=triton.next_power_of_2(d_p),
    )
    if direct:
        return out, lse
    # Flash-decoding combine: weight each split's normalised output by its share of the total
    # softmax mass; a split with no valid position has lse -inf and weight 0.
    total = torch.logsumexp(lse, dim=0)
    pooled = (torch.exp(lse - total)[..., None] * out).sum(dim=0)
    return pooled.to(hidden.dtype), total


@_pool_forward.register_fake
def _(hidden, q, scale, mask, cu_seqlens):
    batch = hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (hidden.new_empty((batch, q.shape[1], hidden.shape[-1])),
            hidden.new_empty((batch, q.shape[1]), dtype=accumulation_dtype(hidden.dtype)))


@torch.library.custom_op("r2m::attention_pool_triton_backward", mutates_args=())
def _pool_backward(grad: torch.Tensor, hidden: torch.Tensor, q: torch.Tensor, pooled: torch.Tensor,
                   lse: torch.Tensor, scale: float, mask: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, need_dhidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq in q.dtype, dhidden in hidden.dtype and shape; an empty tensor when not needed)."""
    lay = _layout(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    batch, heads, d_p = lay["batch"], q.shape[1], hidden.shape[-1]
    heads_per_program = heads if need_dhidden else 1
    programs = batch * heads // heads_per_program
    n_split = _num_splits(programs, lay["typical"], hidden.device)
    delta = (grad.to(acc) * pooled.to(acc)).sum(dim=-1).contiguous()  # D_j = dp_j . p_j
    q_scaled = q.to(acc) * scale
    dq = _empty((n_split, batch, heads, d_p), acc, hidden.device)
    if need_dhidden:
        # Heads are summed in place; with one head the kernel writes the result directly.
        dh_dtype = hidden.dtype if heads == 1 else acc
        dhidden = _empty(hidden.shape, dh_dtype, hidden.device)
    else:
        dhidden = hidden.new_empty(0)
    _pool_bwd_kernel[(programs, n_split)](
        hidden, q_scaled, lay["cu_seqlens"], lay["mask_args"][0], grad, lse.contiguous(), delta, dq,
        dhidden, lay["seq_len"], d_p, heads, heads_per_program,
        lay["stride_hb"], hidden.stride(-2), hidden.stride(-1),
        q_scaled.stride(0), q_scaled.stride(1), q_scaled.stride(2),
        lay["mask_args"][1], lay["mask_args"][2],
        grad.stride(0), grad.stride(1), grad.stride(2),
        PACKED=lay["packed"], HAS_MASK=mask is not None, NEED_DH=need_dhidden, ACC=TL_ACC[acc],
        BLOCK_D=triton.next_power_of_2(d_p),
    )
    return (dq.sum(dim=0) * scale).to(q.dtype), dhidden.to(hidden.dtype)


@_pool_backward.register_fake
def _(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden):
    dhidden = hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0)
    return q.new_empty(q.shape), dhidden


def _setup_context(ctx, inputs, output):
    hidden, q, scale, mask, cu_seqlens = inputs
    pooled, lse = output
    ctx.save_for_backward(hidden, q, pooled, lse, mask, cu_seqlens)
    ctx.scale = scale


def _backward(ctx, grad_pooled, grad_lse):
    # lse is an internal output: nothing differentiates through it.
    hidden, q, pooled, lse, mask, cu_seqlens = ctx.saved_tensors
    need_dhidden = ctx.needs_input_grad[0]
    dq, dhidden = _pool_backward(grad_pooled, hidden, q, pooled, lse, ctx.scale, mask, cu_seqlens,
                                 need_dhidden)
    return (dhidden if need_dhidden else None), dq, None, None, None


_pool_forward.register_autograd(_backward, setup_context=_setup_context)


def attention_pool_triton(hidden, q, scale, mask=None, cu_seqlens=None):
    """The `triton` backend of attention_pool (inputs already validated).

    hidden (B, S, D_p) [+ mask (B, S)] or (N, D_p) + cu_seqlens (B+1,) int32, fp16/bf16/fp32
    (fp64 works, at fp64 speed), D_p <= MAX_D_P; q (B, n_h, D_p) of any float dtype. Returns
    pooled (B, n_h, D_p) in hidden.dtype; differentiable in q and hidden.
    """
    _check_supported(hidden)
    return _pool_forward(hidden, q, float(scale), mask, cu_seqlens)[0]


dispatch.register("attention_pool", "triton", attention_pool_triton, why_not)
