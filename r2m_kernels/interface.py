"""Public functional API: validate (validation.py), pick a backend for these inputs
(dispatch.py), call it."""

from __future__ import annotations

import torch

from . import dispatch
from .validation import validate_attention_pool, validate_grebt, validate_score_mix


def attention_pool(hidden: torch.Tensor, q: torch.Tensor, scale: float, *, mask=None,
                   cu_seqlens=None, backend: str = "auto") -> torch.Tensor:
    """Attention pooling of hidden states by one query per (sequence, head).

        pooled[b, j] = sum_t softmax_t(scale * q[b, j] . h[b, t]) h[b, t]   over valid t

    Args:
        hidden: (B, S, D_p) padded, or (N, D_p) packed; fp16, bf16, fp32 (fp64 for references).
        q: (B, n_h, D_p); may be fp32 when hidden is 16-bit.
        scale: softmax temperature, usually 1/sqrt(d_h).
        mask: (B, S) bool or integer, nonzero = valid (transformers' attention_mask); padded only.
        cu_seqlens: (B+1,) int32 offsets of the sequences in packed hidden.
        backend: "auto", "torch", "triton" or "cuda".
    Returns:
        pooled (B, n_h, D_p) in hidden.dtype. Softmax and accumulation are fp32 (fp64 for fp64 inputs).
    """
    inputs = validate_attention_pool(hidden, q, scale, mask, cu_seqlens)
    _, fn = dispatch.resolve("attention_pool", backend, inputs)
    return fn(inputs.hidden, inputs.q, inputs.scale, mask=inputs.mask, cu_seqlens=inputs.cu_seqlens)


def grebt_loss(rewards: torch.Tensor, group_size: int | None = None, *, cu_groups=None,
               alpha: float = 0.3, eps: float = 1e-6, reduction: str = "mean",
               backend: str = "auto") -> torch.Tensor:
    """Group Reward Entropy Bradley-Terry loss (docs/design.md §1.3).

    Per group: (1 - alpha) * -log sigmoid(r_max - r_min) + alpha * entropy(softmax(z)),
    z = (r - mean) / (population std + eps); the (max, min) pair is selected, not
    differentiated.

    Args:
        rewards: (B,) fp16, bf16, fp32 or fp64.
        group_size: K for B/K contiguous groups of K; or instead
        cu_groups: (G+1,) int32 offsets of ragged groups.
        alpha: mix of the entropy term, in [0, 1]. eps: > 0.
        reduction: "mean" or "sum" over groups (a scalar), or "none" ((G,) per group).
    Returns:
        fp32 loss (fp64 for fp64 rewards).
    """
    inputs = validate_grebt(rewards, group_size, cu_groups, alpha, eps, reduction)
    _, fn = dispatch.resolve("grebt_loss", backend, inputs)
    return fn(inputs.rewards, group_size=inputs.group_size, cu_groups=inputs.cu_groups,
              alpha=inputs.alpha, eps=inputs.eps, reduction=inputs.reduction,
              max_group=inputs.max_group)


def score_mix(attended: torch.Tensor, rte: torch.Tensor, out_weight: torch.Tensor,
              score_weight: torch.Tensor, score_bias=None, *, omega: float,
              backend: str = "auto") -> torch.Tensor:
    """R2M's reward from the attended vector (docs/design.md §1.2), without materialising H_fin:

        reward = phi((1 - omega) * attended W_o^T + omega * rte),   phi(x) = x . w + b
               = (1 - omega) * attended . (W_o^T w) + omega * rte . w + b

    Args:
        attended: (B, d), the heads' outputs concatenated (before W_o).
        rte: (B, D_rm), the reward-token embedding; may be 16-bit.
        out_weight: W_o as nn.Linear(d, D_rm).weight, (D_rm, d).
        score_weight, score_bias: phi as nn.Linear(D_rm, 1): (1, D_rm) and (1,) or None.
        omega: the time-step weight, in [0, 1].
        backend: "auto", "torch", "triton" or "cuda".
    Returns:
        rewards (B,), fp32 (fp64 for an fp64 score head); differentiable in every tensor.
    """
    inputs = validate_score_mix(attended, rte, out_weight, score_weight, score_bias, omega)
    _, fn = dispatch.resolve("score_mix", backend, inputs)
    return fn(*inputs)
