"""The `torch` backend: plain PyTorch, differentiated by autograd.

It defines the semantics every other backend is tested against, and it is the CPU default.
Inputs arrive already validated (see validation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax and accumulation math for inputs of `dtype`: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def attention_pool_torch(hidden, q, scale, mask=None, cu_seqlens=None):
    """pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t] over valid t.

    hidden (B, S, D_p) [+ mask (B, S)] or (N, D_p) + cu_seqlens (B+1,); q (B, n_h, D_p).
    The two products run as matmuls in hidden's dtype (fp32 accumulation inside; for 16-bit
    hidden, q and the scores are rounded to that dtype, as in the eager formula); the
    softmax is fp32 (fp64 for fp64 input). Returns (B, n_h, D_p) in hidden.dtype.
    """
    hidden, mask = padded_sequences(hidden, mask, cu_seqlens)
    acc = accumulation_dtype(hidden.dtype)
    scores = torch.matmul(q.to(hidden.dtype), hidden.transpose(1, 2)).to(acc) * scale  # (B, n_h, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights.to(hidden.dtype), hidden)


def _group_view(x: torch.Tensor, group_size, cu_groups, fill: float):
    """Rewards (B,) -> (G, K_max) with `fill` in the padding, and the (G, K_max) validity mask
    (None for uniform groups)."""
    if group_size is not None:
        return x.view(-1, group_size), None
    sizes = (cu_groups[1:] - cu_groups[:-1]).long()
    k_max = int(sizes.max())
    pos = torch.arange(k_max, device=x.device)
    valid = pos[None, :] < sizes[:, None]
    index = (cu_groups[:-1].long()[:, None] + pos[None, :]).clamp_max(x.shape[0] - 1)
    return x[index].masked_fill(~valid, fill), valid


def grebt_loss_torch(rewards, group_size=None, cu_groups=None, alpha=0.3, eps=1e-6, reduction="mean"):
    """GREBT loss (DESIGN §1.3) per group of rewards; fp32 math, fp32 result.

    rewards (B,); uniform groups of `group_size` or ragged groups given by cu_groups (G+1,).
    Returns a scalar for "mean"/"sum", (G,) for "none".
    """
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc)
    g, valid = _group_view(r, group_size, cu_groups, 0.0)
    count = g.new_full((g.shape[0],), float(g.shape[1])) if valid is None else valid.sum(1).to(acc)

    # The (max, min) pair is selected, not differentiated: first index of each on ties.
    with torch.no_grad():
        hi = g if valid is None else g.masked_fill(~valid, float("-inf"))
        lo = g if valid is None else g.masked_fill(~valid, float("inf"))
        w, l = hi.argmax(dim=1, keepdim=True), lo.argmin(dim=1, keepdim=True)
    bt = F.softplus(g.gather(1, l) - g.gather(1, w)).squeeze(1)  # -log sigmoid(r_w - r_l)

    keep = (lambda t: t) if valid is None else (lambda t: t * valid)
    mean = keep(g).sum(1, keepdim=True) / count[:, None]
    centered = keep(g - mean)
    var = (centered * centered).sum(1, keepdim=True) / count[:, None]
    # sqrt has an infinite derivative at 0: a group of equal rewards gets std = 0 with a zero
    # gradient (its entropy gradient is zero there anyway) instead of 0 * inf = NaN.
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), 0.0)
    z = centered / (std + eps)
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
