"""GREBTLoss: the module form of r2m_kernels.grebt_loss (docs/design.md §1.3)."""

from __future__ import annotations

import torch
import torch.nn as nn

from r2m_kernels import BACKENDS, grebt_loss
from r2m_kernels.validation import REDUCTIONS, check_scalar


class GREBTLoss(nn.Module):
    """(1 - alpha) * Bradley-Terry on each group's (max, min) pair + alpha * the entropy of the
    softmax of the group's standardised rewards; mean over groups by default.

    forward(rewards (B,), group_size=None, *, cu_groups=None) -> loss, fp32 (fp64 for fp64 rewards).
    """

    def __init__(self, alpha: float = 0.3, eps: float = 1e-6, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.alpha = check_scalar("alpha", alpha, low=0.0, high=1.0)
        self.eps = check_scalar("eps", eps, low=0.0, low_open=True)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.reduction, self.backend = reduction, backend

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}, reduction={self.reduction!r}, backend={self.backend!r}"

    def forward(self, rewards: torch.Tensor, group_size: int | None = None, *, cu_groups=None) -> torch.Tensor:
        return grebt_loss(rewards, group_size, cu_groups=cu_groups, alpha=self.alpha, eps=self.eps,
                          reduction=self.reduction, backend=self.backend)
