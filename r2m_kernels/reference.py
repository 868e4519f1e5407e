"""The `torch` backend: plain PyTorch, differentiated by autograd.

It defines the semantics every other backend is tested against, and it is the CPU default.
Inputs arrive already validated (see validation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .precision import accumulation_dtype


def padded_sequences(hidden: torch.Tensor, mask=None, cu_seqlens=None):
    """(hidden (B, S, D) with every invalid position zeroed, bool mask (B, S) or None).

    Packed (N, D) + (B+1,) cu_seqlens is spread into a zero-padded (B, S_max, D). Invalid
    positions are zeroed, not just given zero weight: 0 * NaN = NaN, and pad positions of
    real models' hidden states can hold NaN or Inf; they must not reach the result."""
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        pos = torch.arange(int(lengths.max()), device=hidden.device)
        mask = pos[None, :] < lengths[:, None]
        # Rows past a sequence's end index its neighbour's rows (clamped at N - 1): zeroed below.
        hidden = hidden[(cu_seqlens[:-1].long()[:, None] + pos[None, :]).clamp_max(hidden.shape[0] - 1)]
    if mask is None:
        return hidden, None
    mask = mask.bool()
    return hidden.masked_fill(~mask[..., None], 0), mask


# The 16-bit path works on chunks of sequences whose fp32 copy of hidden holds at most this many
# elements (64 MiB); the copy is recomputed in the backward instead of being kept.
FP32_CHUNK_ELEMENTS = 1 << 24


def _pool_in(acc: torch.dtype, hidden, q, scale, mask):
    """The folded pool of padded hidden (B, S, D_p) with every product in `acc`."""
    rows = hidden.to(acc)
    scores = torch.matmul(q.to(acc), rows.transpose(1, 2)) * scale  # (B, n_h, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), rows).to(hidden.dtype)


def attention_pool_torch(hidden, q, scale, mask=None, cu_seqlens=None):
    """pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t] over valid t.

    hidden (B, S, D_p) [+ mask (B, S)] or (N, D_p) + cu_seqlens (B+1,); q (B, n_h, D_p).
    Scores, softmax and both products are fp32 (fp64 for fp64 hidden), so large 16-bit
    hidden states cannot overflow the scores. For 16-bit hidden the fp32 copy is made a chunk
    of sequences at a time and recomputed in the backward (activation checkpointing), so the
    extra memory stays near one chunk. Returns (B, n_h, D_p) in hidden.dtype.
    """
    hidden, mask = padded_sequences(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    if hidden.dtype == acc:
        return _pool_in(acc, hidden, q, scale, mask)
    per_chunk = max(1, FP32_CHUNK_ELEMENTS // (hidden.shape[1] * hidden.shape[2]))
    # split, not slicing: its backward concatenates the chunks' gradients instead of
    # scattering each into a zero tensor of the whole size.
    masks = [None] * hidden.shape[0] if mask is None else mask.split(per_chunk)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or q.requires_grad)
    parts = []
    for rows, q_rows, mask_rows in zip(hidden.split(per_chunk), q.split(per_chunk), masks):
        if keep_graph:
            parts.append(checkpoint(_pool_in, acc, rows, q_rows, scale, mask_rows, use_reentrant=False))
        else:
            parts.append(_pool_in(acc, rows, q_rows, scale, mask_rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _group_view(x: torch.Tensor, group_size, cu_groups, fill: float, max_group=None):
    """Rewards (B,) -> (G, K_max) with `fill` in the padding, and the (G, K_max) validity mask
    (None for uniform groups)."""
    if group_size is not None:
        return x.view(-1, group_size), None
    sizes = (cu_groups[1:] - cu_groups[:-1]).long()
    k_max = int(sizes.max()) if max_group is None else max_group
    pos = torch.arange(k_max, device=x.device)
    valid = pos[None, :] < sizes[:, None]
    index = (cu_groups[:-1].long()[:, None] + pos[None, :]).clamp_max(x.shape[0] - 1)
    return x[index].masked_fill(~valid, fill), valid


# (an int dtype of the same width, mantissa bits, exponent bias) of the math dtypes.
_FLOAT_BITS = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def inverse_group_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """1/s for each group's largest |reward| `magnitude` (>= 0, fp32 or fp64): s = 2^e with
    e = floor(log2 magnitude) clamped to [1 - bias, bias - 1] (fp32: [-126, 126]), so s and 1/s
    are normal numbers and rewards / s lie in (-4, 4). Made from the exponent bits: multiplying
    by a power of two is exact, and exp2 or ldexp need not be."""
    int_dtype, mantissa, bias = _FLOAT_BITS[magnitude.dtype]
    exponent = ((magnitude.view(int_dtype) >> mantissa) - bias).clamp(1 - bias, bias - 1)
    return ((bias - exponent) << mantissa).view(magnitude.dtype)


def grebt_loss_torch(rewards, group_size=None, cu_groups=None, alpha=0.3, eps=1e-6, reduction="mean",
                     max_group=None):
    """GREBT loss (docs/design.md §1.3) per group of rewards; fp32 math, fp32 result (fp64 for
    fp64 rewards). Finite rewards of any magnitude give a finite loss and gradient.

    rewards (B,); uniform groups of `group_size` or ragged groups given by cu_groups (G+1,)
    (max_group: the largest group, when the caller knows it). Returns a scalar for
    "mean"/"sum", (G,) for "none".
    """
    acc = accumulation_dtype(rewards.dtype)
    info = torch.finfo(acc)
    r = rewards.to(acc)
    g, valid = _group_view(r, group_size, cu_groups, 0.0, max_group)
    count = g.new_full((g.shape[0],), float(g.shape[1])) if valid is None else valid.sum(1).to(acc)

    # The (max, min) pair is selected, not differentiated: first index of each on ties.
    with torch.no_grad():
        hi = g if valid is None else g.masked_fill(~valid, float("-inf"))
        lo = g if valid is None else g.masked_fill(~valid, float("inf"))
        w, l = hi.argmax(dim=1, keepdim=True), lo.argmin(dim=1, keepdim=True)
        columns = torch.arange(g.shape[1], device=g.device)
        pair = (columns == l).to(acc) - (columns == w).to(acc)  # +1 at l, -1 at w, 0 if l = w
        inv_scale = inverse_group_scale(g.abs().amax(1, keepdim=True))  # padding is 0
    # -log sigmoid(r_w - r_l) = softplus(r_l - r_w). r_l - r_w <= 0 overflows only to -inf,
    # where softplus and its gradient are 0: the exact values. A one-hot product rather than
    # gather: its backward is elementwise, where inductor (torch 2.13, CPU) dropped one of the
    # two scatters of the gathers' backward beside this loss's other terms.
    bt = F.softplus((g * pair).sum(1))

    # z in units of s: u = r / s, z = (u - mean u) / (std u + eps / s), the same z term by term
    # (s is a power of two), with |u| < 4 so that neither the sum nor the squares overflow.
    # eps / s is kept within the normal range: below it only a group of equal rewards (std 0,
    # z = 0 / (eps / s)) could tell, and a flushed eps / s would make that 0 / 0.
    u = g * inv_scale
    keep = (lambda t: t) if valid is None else (lambda t: t * valid)
    mean = keep(u).sum(1, keepdim=True) / count[:, None]
    centered = keep(u - mean)
    var = (centered * centered).sum(1, keepdim=True) / count[:, None]
    # sqrt has an infinite derivative at 0: a group of equal rewards gets std = 0 with a zero
    # gradient (its entropy gradient is zero there anyway) instead of 0 * inf = NaN.
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), 0.0)
    eps_scaled = (torch.full_like(inv_scale, min(eps, info.max)) * inv_scale).clamp(info.tiny, info.max)
    z = centered / (std + eps_scaled)
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    gre = -(p * logp.masked_fill(p == 0, 0.0)).sum(1)

    loss = (1.0 - alpha) * bt + alpha * gre
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def score_mix_torch(attended, rte, out_weight, score_weight, score_bias, omega):
    """reward = phi((1 - omega) attended W_o^T + omega rte), phi(x) = x . w + b, without the
    (B, D_rm) mix: phi((1 - omega) c W_o^T) = (1 - omega) c . (W_o^T w) (associativity).

    attended c (B, d); rte (B, D_rm); out_weight W_o (D_rm, d); score_weight w (1, D_rm);
    score_bias b (1,) or None; omega in [0, 1]. Math in fp32 (fp64 for an fp64 score head).
    Returns (B,). The rte term is F.linear(rte, omega w, b), so at omega = 1 the reward is
    bitwise nn.Linear(w, b)(rte) (the mixed term is then 0 * finite = 0).
    """
    acc = torch.promote_types(score_weight.dtype, torch.float32)
    weight = score_weight.to(acc)
    bias = None if score_bias is None else score_bias.to(acc)
    u = weight @ out_weight.to(acc)  # (1, d) = (W_o^T w)^T
    rte_term = F.linear(rte.to(acc), omega * weight, bias)
    return (rte_term + (1.0 - omega) * (attended.to(acc) @ u.T)).squeeze(-1)
