"""The time-step weight of R2M (docs/design.md §1.2): a weight over training steps, not tokens."""

from __future__ import annotations

import math

from r2m_kernels.validation import check_int, check_scalar


def omega(step: float, total_steps: int, floor: float) -> float:
    """omega(t) = max(0.5 cos(pi t / T) + 0.5, floor), with t clamped to [0, T].

    1.0 at t = 0 (the reward is the original RM's), decaying to `floor` at t = T.
    Args: step t (int or float), total_steps T >= 1 (int), floor in [0, 1].
    """
    step = check_scalar("step", step)
    total_steps = check_int("total_steps", total_steps, low=1)
    floor = check_scalar("floor", floor, low=0.0, high=1.0)
    t = min(max(step, 0.0), float(total_steps))
    return max(0.5 * math.cos(math.pi * t / total_steps) + 0.5, floor)
