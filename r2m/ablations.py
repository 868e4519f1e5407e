"""Inputs of the paper's ablations (docs/design.md §1.4): noise_like, what the head reads in
the noise ablation instead of the policy's hidden states."""

from __future__ import annotations

import torch


def noise_like(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Gaussian noise shaped like `hidden` (B, S, D) with its per-feature mean and standard
    deviation over the valid positions of `attention_mask` (B, S): the paper's ablation that
    feeds the head noise instead of the policy's hidden states."""
    valid = hidden[attention_mask.bool()].float()
    noise = torch.randn(hidden.shape, device=hidden.device) * valid.std(0) + valid.mean(0)
    return noise.to(hidden.dtype)
