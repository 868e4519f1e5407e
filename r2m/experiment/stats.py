"""The experiment's statistics, as small pure functions: the paired differences between arms,
the smallest effect a design of n seeds can detect, and Holm's correction over a family of
contrasts.

The t quantiles are computed here (the t density integrated by Simpson's rule, inverted by
bisection) rather than taken from scipy, which is not a dependency of r2m: the experiment
needs two quantiles for small n, and 30 lines are cheaper than a 40 MB package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1; got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    # the density is smooth and unimodal; on [0, x] Simpson's rule with 2000 panels is exact
    # to ~1e-12 for the x the quantiles below need
    panels = 2000
    h = x / panels
    total = density(0.0) + density(x)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, panels))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom, 0 < p < 1 (to ~1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


MIN_SEEDS = 3  # below this, no test, interval or detectable effect is reported


def paired_summary(differences: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> dict:
    """Summary of per-seed paired differences (arm - static): n, mean, sample SD (n >= 2),
    standard error, the two-sided t-test's p-value, the 1 - alpha confidence interval
    (ci_low, ci_high) and the minimum detectable effect

        mde = (t_{1-alpha/2, n-1} + t_{power, n-1}) * SD / sqrt(n)

    the true mean difference that a two-sided paired t-test at level alpha detects with
    probability `power` when the seed-to-seed SD is the one observed.

    With fewer than MIN_SEEDS differences, or none of them differing from the others (SD 0),
    the p-value, the interval and the mde are NaN and `untested` says why: an SD from two
    seeds is too rough to test with, and from zero spread a test or a "detectable effect of 0"
    would claim a certainty the sample does not have. Otherwise `untested` is None."""
    values = [float(d) for d in differences]
    n = len(values)
    if n == 0:
        raise ValueError("no differences to summarise")
    mean = sum(values) / n
    nan = float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else nan
    se = sd / math.sqrt(n)
    summary = dict(n=n, mean=mean, sd=sd, se=se, p_value=nan, ci_low=nan, ci_high=nan, mde=nan, alpha=alpha,
                   power=power, untested=None)
    if n < MIN_SEEDS:
        return dict(summary, untested=f"{n} seed{'s' if n > 1 else ''}, at least {MIN_SEEDS} needed")
    if sd == 0:
        return dict(summary, untested=f"the difference is the same in all {n} seeds (no spread)")
    df = n - 1
    half_width = t_quantile(1 - alpha / 2, df) * se
    return dict(summary, p_value=2 * (1 - t_cdf(abs(mean) / se, df)), ci_low=mean - half_width,
                ci_high=mean + half_width, mde=(t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se)


def area_under(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal mean of `values` over `steps` (the area divided by the span): a run's
    average level, whatever the evaluation spacing."""
    if len(steps) != len(values) or not steps:
        raise ValueError("steps and values must be non-empty and of the same length")
    if len(steps) == 1:
        return float(values[0])
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:]))
    return area / (steps[-1] - steps[0])


def holm(p_values: Mapping[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm's step-down correction over one family of tests, {name: p-value} -> {name:
    {"p_holm", "reject"}}: the adjusted p-value (the smallest family-wise level at which the
    step-down procedure rejects it) and whether it is rejected at `alpha`.

    Sorted p_(1) <= ... <= p_(m), p_holm_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). A NaN
    p-value (a contrast paired_summary left untested) stays in the family as p = 1: it is never
    rejected, its p_holm is NaN, and the others are corrected as for the whole family."""
    m = len(p_values)
    as_tested = {name: 1.0 if math.isnan(p) else float(p) for name, p in p_values.items()}
    adjusted, running = {}, 0.0
    for rank, name in enumerate(sorted(as_tested, key=as_tested.get)):
        running = max(running, min(1.0, (m - rank) * as_tested[name]))
        adjusted[name] = running
    return {name: {"p_holm": float("nan") if math.isnan(p) else adjusted[name],
                   "reject": not math.isnan(p) and adjusted[name] <= alpha}
            for name, p in p_values.items()}
