"""Metrics of R2M training that the trainer logs and the experiment reports."""

from __future__ import annotations

import torch


def pairwise_agreement(scores: torch.Tensor, truth: torch.Tensor, group_size: int) -> tuple[float, int]:
    """Within each contiguous group of `group_size`, over the pairs whose `truth` differs: the
    fraction that `scores` orders the same way (a tie in `scores` counts one half). Returns
    (fraction, number of pairs); the fraction is NaN when no pair has distinct truth.
    scores, truth: (B,) with B a multiple of group_size."""
    if scores.shape != truth.shape or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores and truth must be 1-D of the same length, a multiple of {group_size}; "
                         f"got {tuple(scores.shape)} and {tuple(truth.shape)}")
    s = scores.detach().double().view(-1, group_size)
    t = truth.detach().double().view(-1, group_size)
    ds = s[:, :, None] - s[:, None, :]
    dt = t[:, :, None] - t[:, None, :]
    counted = dt > 0  # each unordered pair once, from its better side
    pairs = int(counted.sum())
    if pairs == 0:
        return float("nan"), 0
    agree = (ds > 0).double() + 0.5 * (ds == 0).double()
    return float(agree[counted].sum()) / pairs, pairs


def reranked_share(scores: torch.Tensor, reference: torch.Tensor, group_size: int) -> float:
    """The share of contiguous groups of `group_size` whose best or worst member (the first
    index of the maximum or of the minimum, the pair GREBT takes) under `scores` differs from
    the one under `reference`: how often a reward re-ranks a group's ends against another.
    scores, reference: (B,) with B a multiple of group_size."""
    if scores.shape != reference.shape or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores and reference must be 1-D of the same length, a multiple of {group_size}; "
                         f"got {tuple(scores.shape)} and {tuple(reference.shape)}")
    s, r = scores.detach().view(-1, group_size), reference.detach().view(-1, group_size)
    moved = (s.argmax(-1) != r.argmax(-1)) | (s.argmin(-1) != r.argmin(-1))
    return moved.double().mean().item()


# The head's attention (R2MHead.attention_weights: weights (B, n_h, S), 0 at masked positions).

def completion_attention_mass(weights: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """(B, n_h): each head's attention weight summed over the completion's positions.
    weights (B, n_h, S); completion (B, S) bool (r2m.tokens.completion_positions)."""
    return (weights * completion[:, None, :].to(weights.dtype)).sum(-1)


def max_attention_weight(weights: torch.Tensor) -> torch.Tensor:
    """(B, n_h): each head's largest attention weight (1 when it looks at one position only)."""
    return weights.amax(-1)


def shared_focus(weights: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, group_size: int,
                 rtol: float = 1e-2) -> torch.Tensor:
    """(G,) bool, one per contiguous group of `group_size` rows: whether every head of every
    row of the group has its most-attended position (the first argmax of its weights) on a
    hidden state that every row of the group holds at some position `mask` marks valid, to a
    relative tolerance: ||h_r[s] - h_focus|| <= rtol * ||h_focus|| (Euclidean norms). A prompt's
    positions are shared by its whole group (the same tokens before them); a completion prefix
    common to the group is too. In such a group the head's term varies between the rows only
    through their RTEs and the weight left off the focus, not through what the completions say.
    weights (B, n_h, S); hidden (B, S, D) the head's input; mask (B, S), nonzero = valid."""
    b, n_h, s = weights.shape
    if hidden.shape[:2] != (b, s) or mask.shape != (b, s) or b % group_size:
        raise ValueError(f"weights (B, n_h, S), hidden (B, S, D) and mask (B, S) must agree, B a multiple of "
                         f"{group_size}; got {tuple(weights.shape)}, {tuple(hidden.shape)}, {tuple(mask.shape)}")
    groups, d = b // group_size, hidden.shape[-1]
    h = hidden.detach().double()
    focus = h[torch.arange(b, device=h.device)[:, None], weights.argmax(-1)]  # (B, n_h, D)
    focus = focus.view(groups, group_size * n_h, d)
    distance = torch.cdist(focus, h.view(groups, group_size * s, d))  # (G, K n_h, K S)
    close = (distance <= rtol * focus.norm(dim=-1, keepdim=True)) & mask.bool().view(groups, 1, group_size * s)
    in_every_row = close.view(groups, group_size * n_h, group_size, s).any(-1).all(-1)
    return in_every_row.all(-1)
