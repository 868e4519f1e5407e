"""GREBT loss (docs/design.md §1.3) as one Triton kernel that also writes the gradient.

Each program takes a tile of BLOCK_G groups x BLOCK_K rewards (one group per row, the group's
rewards along the row), finds each group's (max, min) pair, the Bradley-Terry term, the entropy
of the softmax of the standardised rewards, their mix, and d loss / d r for every reward in the
same pass. The backward pass is only grad_output times that saved gradient, so forward plus
backward is one Triton launch, one reduction over the per-group losses ("mean"/"sum", no
atomics, deterministic) and one elementwise scale.

Gradient, per group of K rewards (c = r - mean, s = population std, d = s + eps, z = c / d,
p = softmax(z), H = -sum p log p, w / l = first index of the max / min):

    BT:   dL/dr_w = -sigma(r_l - r_w),  dL/dr_l = +sigma(r_l - r_w)    (cancel when w = l)
    GRE:  g_j = dH/dz_j = -p_j (log p_j + H),   c_hat = c / s   (0 when s = 0: the
          reference gives the std no gradient there), m = mean_j g_j c_hat_j
          dH/dr = [g - mean(g) - c_hat m] / d  +  (eps / d^2) c_hat m

The second line is the chain rule through mean and std (ds/dr_k = c_hat_k / K) regrouped: the
bracket is g projected off 1 and c_hat, and the eps term, the true gradient when K = 2, is
added on its own instead of as the difference of two O(g / d) terms.

Scale: the kernel works on u = r / 2^e, 2^e the group's largest |r| rounded down to a power of
two (_group_scale), where it divides eps by 2^e too. z is unchanged (the same numbers scaled
exactly), no sum or square overflows whatever the rewards' magnitude, and dH/dr is dH/du / 2^e.
BT uses r itself: r_l - r_w overflows only to -inf, where softplus and sigma are exactly 0.

fp16/bf16/fp32 rewards: math in fp32; fp64 rewards: math in fp64 (so gradcheck can test the
kernel itself).
"""

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..custom_ops import define_grebt_op
from ..grebt_host import grebt_groups, grebt_loss_over
from ..precision import accumulation_dtype
from . import common
from .common import INTERPRET, TL_ACC, join_scalar, split_scalar

# Largest group the single-tile kernel takes: a group lives in one program's registers.
MAX_GROUP_SIZE = 16384
# Rewards per program when groups are small: enough groups per tile to amortise the program.
_TILE_ELEMENTS = 1024
# Local-memory spill (bytes stored + loaded, ptxas for sm_90) the forward kernel may have: a
# group of MAX_GROUP_SIZE fp64 rewards with the gradient spills most; ptxas spills it
# differently under each supported Triton, so the bound sits a little above all of them (9448
# bytes under Triton 3.9 with the group scale), and more than this means the kernel got worse
# (tests/support/triton_compile.py checks it).
FWD_SPILL_BYTES = 9728


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for tiny x (Goldberg's trick; Triton has no portable log1p)."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _group_scale(magnitude, eps, ACC: tl.constexpr):
    """(2^-e, eps 2^-e) per group from its largest |reward| `magnitude` (BLOCK_G,), as the
    reference's inverse_group_scale: e = floor(log2 magnitude) clamped so that 2^e and 2^-e
    are normal, 2^-e made from the exponent bits (exact), eps 2^-e clamped to the normal range."""
    if ACC == tl.float64:
        exponent = (magnitude.to(tl.int64, bitcast=True) >> 52) - 1023
        exponent = tl.minimum(tl.maximum(exponent, -1022), 1022)
        inv_scale = ((1023 - exponent) << 52).to(tl.float64, bitcast=True)
        eps_scaled = tl.minimum(tl.maximum(eps * inv_scale, 2.2250738585072014e-308), 1.7976931348623157e308)
    else:
        exponent = (magnitude.to(tl.int32, bitcast=True) >> 23) - 127
        exponent = tl.minimum(tl.maximum(exponent, -126), 126)
        inv_scale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
        eps_scaled = tl.minimum(tl.maximum(eps * inv_scale, 1.1754943508222875e-38), 3.4028234663852886e38)
    return inv_scale, eps_scaled


@triton.jit
def _grebt_fwd_kernel(
    rewards_ptr, cu_groups_ptr, loss_ptr, grad_ptr,
    num_groups, group_size, alpha_hi, alpha_lo, eps_hi, eps_lo, loss_scale_hi, loss_scale_lo,
    RAGGED: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """loss (G,): each group's loss times loss_scale; with WRITE_GRAD, grad (B,): d loss / d r
    times loss_scale. A program takes BLOCK_G groups of up to BLOCK_K rewards.

    Spills: a program holds whole groups in registers, at most 1024 threads, so groups of
    thousands of rewards spill to local memory (fp64 most), up to FWD_SPILL_BYTES. fp64 is for
    gradcheck; RL groups hold 4 to 64 responses and do not spill; a multi-pass kernel for
    groups of thousands is not worth its complexity."""
    alpha = join_scalar(alpha_hi, alpha_lo, ACC)
    eps = join_scalar(eps_hi, eps_lo, ACC)
    loss_scale = join_scalar(loss_scale_hi, loss_scale_lo, ACC)
    pid = tl.program_id(0)
    group = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = group < num_groups
    if RAGGED:
        start = tl.load(cu_groups_ptr + group, mask=group_ok, other=0)
        size = tl.load(cu_groups_ptr + group + 1, mask=group_ok, other=1) - start
    else:
        start = group * group_size
        size = tl.zeros([BLOCK_G], dtype=tl.int32) + group_size
    col = tl.arange(0, BLOCK_K)
    valid = group_ok[:, None] & (col[None, :] < size[:, None])
    offs = start[:, None].to(tl.int64) + col[None, :]
    r = tl.load(rewards_ptr + offs, mask=valid, other=0.0).to(ACC)
    count = tl.maximum(size, 1).to(ACC)

    # The pair: first index of the max and of the min (tl.argmax/argmin break ties to the left).
    r_hi = tl.where(valid, r, float("-inf"))
    r_lo = tl.where(valid, r, float("inf"))
    w = tl.argmax(r_hi, axis=1)
    l = tl.argmin(r_lo, axis=1)
    r_max = tl.where(group_ok, tl.max(r_hi, axis=1), 0.0)
    r_min = tl.where(group_ok, tl.min(r_lo, axis=1), 0.0)
    # r_l - r_w <= 0 overflows only to -inf, where bt and sig are 0, their exact values.
    gap = r_min - r_max
    e_gap = tl.exp(gap)  # in [0, 1]: no overflow
    bt = _log1p(e_gap)  # -log sigmoid(r_w - r_l) = softplus(r_l - r_w)
    sig = e_gap / (1.0 + e_gap)  # sigmoid(r_l - r_w)

    # Standardise with the population std, in units of 2^e (_group_scale): u = r 2^-e exactly,
    # |u| < 4, so neither the sum nor the squares overflow, and z = (u - mean u) / (std u +
    # eps 2^-e) is the z of r. Equal rewards have std = 0.
    inv_scale, eps_scaled = _group_scale(tl.maximum(r_max, -r_min), eps, ACC)
    u = r * inv_scale[:, None]
    mean = tl.sum(u, axis=1) / count
    c = tl.where(valid, u - mean[:, None], 0.0)
    # The rounded mean leaves sum c = K delta, delta ~ ulp(mean): when the spread is near
    # ulp(mean) that shift breaks the gradient's invariance to adding a constant (it must sum
    # to 0 over the group). Centring again removes it (the corrected two-pass variance).
    c = tl.where(valid, c - (tl.sum(c, axis=1) / count)[:, None], 0.0)
    var = tl.sum(c * c, axis=1) / count
    positive = var > 0.0
    std = tl.where(positive, tl.sqrt(tl.where(positive, var, 1.0)), 0.0)
    d = std + eps_scaled
    z = c / d[:, None]

    # Entropy of softmax(z): t = z - max z <= 0, S0 = sum e^t, H = log S0 - sum p t.
    z_max = tl.max(tl.where(valid, z, float("-inf")), axis=1)
    z_max = tl.where(group_ok, z_max, 0.0)
    t = tl.where(valid, z - z_max[:, None], 0.0)
    e = tl.where(valid, tl.exp(t), 0.0)
    s0 = tl.where(group_ok, tl.sum(e, axis=1), 1.0)  # >= 1 on real groups (the max has t = 0)
    log_s0 = tl.log(s0)
    p = e / s0[:, None]
    gre = log_s0 - tl.sum(p * t, axis=1)

    loss = (1.0 - alpha) * bt + alpha * gre
    tl.store(loss_ptr + group, (loss * loss_scale).to(loss_ptr.dtype.element_ty), mask=group_ok)

    if WRITE_GRAD:
        g = tl.where(valid, -p * (t - log_s0[:, None] + gre[:, None]), 0.0)
        # dz/dr = (I - 11^T/K - c_hat c_hat^T/K) / d + c_hat (eps / d^2) c_hat^T / K (docstring).
        c_hat = c / tl.where(positive, std, 1.0)[:, None]
        g_mean = tl.sum(g, axis=1) / count
        gc_mean = tl.sum(g * c_hat, axis=1) / count
        projected = g - g_mean[:, None] - c_hat * gc_mean[:, None]
        # alpha dH/dr = alpha 2^-e dH/du
        gre_scale = alpha * inv_scale / d
        grad_gre = (projected + c_hat * (eps_scaled / d * gc_mean)[:, None]) * gre_scale[:, None]
        pair = (col[None, :] == l[:, None]).to(ACC) - (col[None, :] == w[:, None]).to(ACC)
        grad = grad_gre + ((1.0 - alpha) * sig)[:, None] * pair
        tl.store(grad_ptr + offs, (grad * loss_scale).to(grad_ptr.dtype.element_ty), mask=valid)


def _num_warps(tile: int) -> int:
    """Warps for a tile of `tile` rewards: 4 per thread (8 spilled in fp32 with the gradient),
    up to 1024 threads."""
    return max(1, min(32, tile // (32 * 4)))


def _grebt_forward(rewards, group_size, cu_groups, max_group, alpha, eps, reduction, write_grad):
    """(loss: scalar, or (G,) for "none"; d loss / d rewards (B,), empty unless write_grad),
    both in the math's dtype."""
    acc = accumulation_dtype(rewards.dtype)
    rewards = rewards.contiguous()
    n = rewards.shape[0]
    num_groups, k_max = grebt_groups(rewards, group_size, cu_groups, max_group)
    if k_max > MAX_GROUP_SIZE:  # reached only by direct calls: dispatch's probe refuses these
        raise ValueError(f"grebt_loss backend='triton' takes groups of up to {MAX_GROUP_SIZE} "
                         f"rewards, got a group of {k_max}; use backend='torch'")
    block_k = triton.next_power_of_2(k_max)
    block_g = max(1, min(_TILE_ELEMENTS // block_k, triton.next_power_of_2(num_groups)))
    if INTERPRET:
        block_g = min(block_g, 16)  # the interpreter is faster on small tiles
    loss_scale = 1.0 / num_groups if reduction == "mean" else 1.0
    per_group = torch.empty(num_groups, dtype=acc, device=rewards.device)
    grad = torch.empty(n if write_grad else 0, dtype=acc, device=rewards.device)
    grid = (triton.cdiv(num_groups, block_g),)
    _grebt_fwd_kernel[grid](
        rewards, cu_groups if cu_groups is not None else per_group, per_group, grad,
        num_groups, k_max if cu_groups is None else 0,
        *split_scalar(alpha), *split_scalar(eps), *split_scalar(loss_scale),
        RAGGED=cu_groups is not None, WRITE_GRAD=write_grad,
        BLOCK_G=block_g, BLOCK_K=block_k, ACC=TL_ACC[acc],
        num_warps=_num_warps(block_g * block_k),
    )
    return (per_group if reduction == "none" else per_group.sum()), grad


_grebt_op = define_grebt_op("grebt_loss_triton", _grebt_forward)


def why_not_inputs(inputs) -> str | None:
    """None when the kernel takes the validated grebt_loss inputs, else the reason."""
    if inputs.max_group is not None and inputs.max_group > MAX_GROUP_SIZE:
        return (f"the Triton GREBT kernel holds a group in one program and takes groups of up to "
                f"{MAX_GROUP_SIZE} rewards, got a group of {inputs.max_group}")
    return None


grebt_loss_triton = grebt_loss_over(_grebt_op, "grebt_loss_triton", """\
    GREBT loss (docs/design.md §1.3); same semantics as reference.grebt_loss_torch.

    rewards (B,) fp16/bf16/fp32 (math in fp32) or fp64 (math in fp64); uniform groups of
    `group_size` or ragged groups given by cu_groups (G+1,) int32 (max_group: the largest,
    when known). Returns a scalar for "mean"/"sum", (G,) for "none"; fp32 (fp64 for fp64
    rewards). Groups of up to MAX_GROUP_SIZE rewards.
    """)


dispatch.register("grebt_loss", "triton", grebt_loss_triton, common.why_not_device, why_not_inputs)
