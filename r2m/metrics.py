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
