"""R2M's reward from the attended vector as one Triton kernel forward and one backward.

    reward_b = phi((1 - omega) c_b W_o^T + omega rte_b),   phi(x) = x . w + bias
             = (1 - omega) c_b . u + omega rte_b . w + bias,   u = W_o^T w   (d,)

By associativity the (B, D_rm) mix H_fin is never formed: the forward reads W_o once (for u)
and c and rte once each. Gradients, with g = d loss / d reward (B,) and v = (1 - omega) c^T g:

    d c    = (1 - omega) g u^T          d rte = omega g w
    d W_o  = w^T v^T   (rank one)       d w   = W_o v + omega rte^T g      d bias = sum g

Grid, forward and backward alike: programs [0, n_d) own a chunk of BLOCK_D columns of d (of
c, u, W_o), programs [n_d, n_d + n_r) a chunk of BLOCK_R columns of D_rm (of rte, w). Each
writes its share of the per-row sums (forward) or of d w (backward) to its own row of a small
partial buffer that one torch.sum reduces: no atomics, deterministic. Forward: reads W_o, c,
rte once. Backward: reads c, rte once and W_o once (only when w needs a gradient), writes
d W_o once (only when W_o needs one), d c and d rte.
"""

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..custom_ops import define_score_mix_op
from . import common
from .common import TL_ACC, join_scalar, split_scalar

# Static tiles: enough d-chunks (d / BLOCK_D) to spread the W_o read over the SMs at d = 2048,
# and W_o tiles of BLOCK_R x BLOCK_D elements large enough to keep a few KB of loads in flight
# per program.
_BLOCK_D = 16  # columns of d per program (W_o row segments of 64 bytes in fp32)
_BLOCK_R = 128  # columns of D_rm per program, and rows of W_o per loop step
_BLOCK_B = 32  # rows of the batch per loop step


# Each kernel's two kinds of program are separate functions: a variable of a runtime `if`'s two
# branches must have one type in both, and the chunks have different widths.
@triton.jit
def _fwd_attended_chunk(
    chunk, attended_ptr, out_weight_ptr, score_weight_ptr, score_bias_ptr, u_ptr, partial_ptr,
    batch, attn_dim, rm_dim, omega, stride_attended,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """u[chunk] = W_o[:, chunk]^T w, then (1 - omega) c[:, chunk] . u[chunk] (+ the bias, once)
    for every row, into row `chunk` of the partial sums."""
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < attn_dim
    u = tl.zeros([BLOCK_D], dtype=ACC)
    for r0 in range(0, rm_dim, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < rm_dim
        w = tl.load(score_weight_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        w_o = tl.load(out_weight_ptr + rows[:, None].to(tl.int64) * attn_dim + cols[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        u += tl.sum(w_o * w[:, None], axis=0)
    tl.store(u_ptr + cols, u, mask=col_ok)
    bias = tl.zeros([], dtype=ACC)
    if HAS_BIAS:
        bias = tl.where(chunk == 0, tl.load(score_bias_ptr).to(ACC), bias)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < batch
        c = tl.load(attended_ptr + b[:, None].to(tl.int64) * stride_attended + cols[None, :],
                    mask=b_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        part = (1.0 - omega) * tl.sum(c * u[None, :], axis=1) + bias
        tl.store(partial_ptr + chunk * batch + b, part, mask=b_ok)


@triton.jit
def _fwd_rte_chunk(
    chunk, slot, rte_ptr, score_weight_ptr, partial_ptr, batch, rm_dim, omega, stride_rte,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """omega rte[:, chunk] . w[chunk] for every row, into row `slot` of the partial sums."""
    cols = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < rm_dim
    w = omega * tl.load(score_weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < batch
        x = tl.load(rte_ptr + b[:, None].to(tl.int64) * stride_rte + cols[None, :],
                    mask=b_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        tl.store(partial_ptr + slot * batch + b, tl.sum(x * w[None, :], axis=1), mask=b_ok)


@triton.jit
def _score_mix_fwd_kernel(
    attended_ptr, rte_ptr, out_weight_ptr, score_weight_ptr, score_bias_ptr, u_ptr, partial_ptr,
    batch, attn_dim, rm_dim, num_d_chunks, omega_hi, omega_lo, stride_attended, stride_rte,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """partial (n_d + n_r, B): each program's share of every reward; u (d,) = W_o^T w."""
    omega = join_scalar(omega_hi, omega_lo, ACC)
    pid = tl.program_id(0)
    if pid < num_d_chunks:
        _fwd_attended_chunk(pid, attended_ptr, out_weight_ptr, score_weight_ptr, score_bias_ptr, u_ptr,
                            partial_ptr, batch, attn_dim, rm_dim, omega, stride_attended,
                            HAS_BIAS, BLOCK_B, BLOCK_D, BLOCK_R, ACC)
    else:
        _fwd_rte_chunk(pid - num_d_chunks, pid, rte_ptr, score_weight_ptr, partial_ptr, batch, rm_dim,
                       omega, stride_rte, BLOCK_B, BLOCK_R, ACC)


@triton.jit
def _batch_pass(
    grad_ptr, x_ptr, stride_x, d_x_ptr, width, cols, col_ok, coef, scale, batch,
    NEED_X_G: tl.constexpr, NEED_D_X: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """The backward's one pass over the batch for the columns `cols` of an input x (B, width)
    that enters the reward as scale * x . coef: returns x[:, cols]^T g (zeros unless NEED_X_G)
    and, with NEED_D_X, writes d x[:, cols] = scale g coef[cols] (d x contiguous)."""
    x_g = tl.zeros([BLOCK_C], dtype=ACC)
    for b0 in range(0, batch, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < batch
        tile_ok = b_ok[:, None] & col_ok[None, :]
        g = tl.load(grad_ptr + b, mask=b_ok, other=0.0).to(ACC)
        if NEED_X_G:
            x = tl.load(x_ptr + b[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=tile_ok, other=0.0).to(ACC)
            x_g += tl.sum(x * g[:, None], axis=0)
        if NEED_D_X:
            tl.store(d_x_ptr + b[:, None].to(tl.int64) * width + cols[None, :],
                     (scale * g[:, None] * coef[None, :]).to(d_x_ptr.dtype.element_ty), mask=tile_ok)
    return x_g


@triton.jit
def _bwd_attended_chunk(
    chunk, grad_ptr, attended_ptr, out_weight_ptr, score_weight_ptr, u_ptr,
    d_attended_ptr, d_out_weight_ptr, d_weight_partial_ptr,
    batch, attn_dim, rm_dim, omega, stride_attended,
    NEED_D_ATTENDED: tl.constexpr, NEED_D_OUT_WEIGHT: tl.constexpr, NEED_D_SCORE_WEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """d c[:, chunk] = (1 - omega) g u[chunk]; with v = (1 - omega) c[:, chunk]^T g:
    d W_o[:, chunk] = w v^T, and W_o[:, chunk] v into row `chunk` of d w's partial sums."""
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < attn_dim
    u = tl.load(u_ptr + cols, mask=col_ok, other=0.0)
    c_g = _batch_pass(grad_ptr, attended_ptr, stride_attended, d_attended_ptr, attn_dim, cols, col_ok, u,
                      1.0 - omega, batch, NEED_D_OUT_WEIGHT or NEED_D_SCORE_WEIGHT, NEED_D_ATTENDED,
                      BLOCK_B, BLOCK_D, ACC)
    v = (1.0 - omega) * c_g  # d loss / d u[chunk]
    if NEED_D_OUT_WEIGHT or NEED_D_SCORE_WEIGHT:
        for r0 in range(0, rm_dim, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < rm_dim
            tile = rows[:, None].to(tl.int64) * attn_dim + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            if NEED_D_OUT_WEIGHT:
                w = tl.load(score_weight_ptr + rows, mask=row_ok, other=0.0).to(ACC)
                tl.store(d_out_weight_ptr + tile,
                         (w[:, None] * v[None, :]).to(d_out_weight_ptr.dtype.element_ty), mask=tile_ok)
            if NEED_D_SCORE_WEIGHT:
                w_o = tl.load(out_weight_ptr + tile, mask=tile_ok, other=0.0).to(ACC)
                tl.store(d_weight_partial_ptr + chunk * rm_dim + rows, tl.sum(w_o * v[None, :], axis=1),
                         mask=row_ok)


@triton.jit
def _bwd_rte_chunk(
    chunk, grad_ptr, rte_ptr, score_weight_ptr, d_rte_ptr, d_weight_partial_ptr,
    batch, rm_dim, num_d_chunks, omega, stride_rte,
    NEED_D_RTE: tl.constexpr, NEED_D_SCORE_WEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """d rte[:, chunk] = omega g w[chunk]; omega rte[:, chunk]^T g into the last row of d w's
    partial sums."""
    cols = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < rm_dim
    w = tl.load(score_weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    rte_g = _batch_pass(grad_ptr, rte_ptr, stride_rte, d_rte_ptr, rm_dim, cols, col_ok, w, omega, batch,
                        NEED_D_SCORE_WEIGHT, NEED_D_RTE, BLOCK_B, BLOCK_R, ACC)
    if NEED_D_SCORE_WEIGHT:
        tl.store(d_weight_partial_ptr + num_d_chunks * rm_dim + cols, omega * rte_g, mask=col_ok)


@triton.jit
def _score_mix_bwd_kernel(
    grad_ptr, attended_ptr, rte_ptr, out_weight_ptr, score_weight_ptr, u_ptr,
    d_attended_ptr, d_rte_ptr, d_out_weight_ptr, d_weight_partial_ptr,
    batch, attn_dim, rm_dim, num_d_chunks, omega_hi, omega_lo, stride_attended, stride_rte,
    NEED_D_ATTENDED: tl.constexpr, NEED_D_RTE: tl.constexpr, NEED_D_OUT_WEIGHT: tl.constexpr,
    NEED_D_SCORE_WEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """d attended, d rte, d W_o written in full where needed; d w as (n_d + 1, D_rm) partial
    sums that the host adds."""
    omega = join_scalar(omega_hi, omega_lo, ACC)
    pid = tl.program_id(0)
    if pid < num_d_chunks:
        _bwd_attended_chunk(pid, grad_ptr, attended_ptr, out_weight_ptr, score_weight_ptr, u_ptr,
                            d_attended_ptr, d_out_weight_ptr, d_weight_partial_ptr,
                            batch, attn_dim, rm_dim, omega, stride_attended,
                            NEED_D_ATTENDED, NEED_D_OUT_WEIGHT, NEED_D_SCORE_WEIGHT,
                            BLOCK_B, BLOCK_D, BLOCK_R, ACC)
    else:
        _bwd_rte_chunk(pid - num_d_chunks, grad_ptr, rte_ptr, score_weight_ptr, d_rte_ptr,
                       d_weight_partial_ptr, batch, rm_dim, num_d_chunks, omega, stride_rte,
                       NEED_D_RTE, NEED_D_SCORE_WEIGHT, BLOCK_B, BLOCK_R, ACC)


def _rows_contiguous(t):
    """Unit stride along the last dimension (rows may be strided, as in a slice of hidden states)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(attn_dim: int, rm_dim: int) -> tuple[int, int]:
    """(programs over d, all programs): d-chunks first, then D_rm-chunks."""
    num_d_chunks = triton.cdiv(attn_dim, _BLOCK_D)
    return num_d_chunks, num_d_chunks + triton.cdiv(rm_dim, _BLOCK_R)


def _forward(attended, rte, out_weight, score_weight, score_bias, omega):
    """(rewards (B,), u = W_o^T w (d,)), both in the accumulation dtype; u is kept for backward."""
    acc = torch.promote_types(score_weight.dtype, torch.float32)
    attended, rte = _rows_contiguous(attended), _rows_contiguous(rte)
    out_weight, score_weight = out_weight.contiguous(), score_weight.contiguous()
    batch, attn_dim = attended.shape
    rm_dim = rte.shape[1]
    num_d_chunks, num_programs = _grid(attn_dim, rm_dim)
    u = torch.empty(attn_dim, dtype=acc, device=attended.device)
    partial = torch.empty(num_programs, batch, dtype=acc, device=attended.device)
    _score_mix_fwd_kernel[(num_programs,)](
        attended, rte, out_weight, score_weight, score_bias if score_bias is not None else u,
        u, partial, batch, attn_dim, rm_dim, num_d_chunks, *split_scalar(omega), attended.stride(0),
        rte.stride(0),
        HAS_BIAS=score_bias is not None, BLOCK_B=_BLOCK_B, BLOCK_D=_BLOCK_D, BLOCK_R=_BLOCK_R,
        ACC=TL_ACC[acc],
    )
    return partial.sum(0), u


def _backward(grad, attended, rte, out_weight, score_weight, u, omega, need_c, need_rte, need_w_o,
              need_w):
    """(d attended, d rte, d W_o, d w (1, D_rm)), each in its input's dtype; an empty tensor
    for a gradient that is not needed."""
    attended, rte = _rows_contiguous(attended), _rows_contiguous(rte)
    out_weight, score_weight = out_weight.contiguous(), score_weight.contiguous()
    batch, attn_dim = attended.shape
    rm_dim = rte.shape[1]
    num_d_chunks, num_programs = _grid(attn_dim, rm_dim)

    def output(shape, dtype, needed):  # custom ops may not return one tensor twice: no shared placeholder
        return torch.empty(shape if needed else (0,), dtype=dtype, device=u.device)

    d_attended = output(attended.shape, attended.dtype, need_c)
    d_rte = output(rte.shape, rte.dtype, need_rte)
    d_out_weight = output(out_weight.shape, out_weight.dtype, need_w_o)
    d_weight_partial = output((num_d_chunks + 1, rm_dim), u.dtype, need_w)
    if need_c or need_rte or need_w_o or need_w:
        _score_mix_bwd_kernel[(num_programs,)](
            grad, attended, rte, out_weight, score_weight, u,
            d_attended if need_c else u, d_rte if need_rte else u,
            d_out_weight if need_w_o else u, d_weight_partial if need_w else u,
            batch, attn_dim, rm_dim, num_d_chunks, *split_scalar(omega), attended.stride(0),
            rte.stride(0),
            NEED_D_ATTENDED=need_c, NEED_D_RTE=need_rte, NEED_D_OUT_WEIGHT=need_w_o,
            NEED_D_SCORE_WEIGHT=need_w, BLOCK_B=_BLOCK_B, BLOCK_D=_BLOCK_D, BLOCK_R=_BLOCK_R,
            ACC=TL_ACC[u.dtype],
        )
    d_score_weight = (d_weight_partial.sum(0, keepdim=True).to(score_weight.dtype) if need_w
                      else score_weight.new_empty(0))
    return d_attended, d_rte, d_out_weight, d_score_weight


_score_mix_op = define_score_mix_op("score_mix_triton", _forward, _backward)


def score_mix_triton(attended, rte, out_weight, score_weight, score_bias, omega):
    """reward = (1 - omega) attended . (W_o^T w) + omega rte . w + bias (r2m_kernels.score_mix).

    attended (B, d), rte (B, D_rm), out_weight (D_rm, d), score_weight (1, D_rm), score_bias
    (1,) or None; any float dtypes (rte often 16-bit). Math in fp32 (fp64 for an fp64 score
    head). Returns rewards (B,) in that dtype; gradients in each input's dtype.
    """
    return _score_mix_op(attended, rte, out_weight, score_weight, score_bias, float(omega))[0]


dispatch.register("score_mix", "triton", score_mix_triton, common.why_not_device)
