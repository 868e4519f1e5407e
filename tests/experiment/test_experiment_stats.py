"""The experiment's statistics on synthetic inputs with known answers: t quantiles, the paired
summary (mean, SD, SE, p-value, minimum detectable effect), within-group agreement, the AUC."""

import math

import pytest
import torch

from r2m.experiment.stats import area_under, paired_summary, t_cdf, t_quantile
from r2m.metrics import pairwise_agreement


def t2_cdf(t):
    """Student's t with 2 degrees of freedom has a closed-form CDF."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


@pytest.mark.parametrize("t", [-6.0, -1.3, 0.0, 0.4, 1.0, 2.5, 9.0])
def test_t_cdf_matches_closed_forms(t):
    assert t_cdf(t, 2) == pytest.approx(t2_cdf(t), abs=1e-10)
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-9)  # Cauchy


@pytest.mark.parametrize("p, df, expected", [
    # printed t tables (3 decimals)
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 29, 2.045),
    (0.8, 2, 1.061), (0.8, 4, 0.941), (0.95, 5, 2.015),
])
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=5e-4)


def test_t_quantile_inverts_the_closed_form():
    for p in (0.6, 0.9, 0.99, 0.999):
        assert t2_cdf(t_quantile(p, 2)) == pytest.approx(p, abs=1e-9)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)


def test_paired_summary_known_answer():
    s = paired_summary([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["sd"] == pytest.approx(1.0)
    assert s["se"] == pytest.approx(1 / math.sqrt(3))
    # t = 2 / (1 / sqrt 3) with 2 degrees of freedom: p = 2 (1 - F(t)) in closed form
    assert s["p_value"] == pytest.approx(2 * (1 - t2_cdf(2 * math.sqrt(3))), abs=1e-9)
    assert s["mde"] == pytest.approx((t_quantile(0.975, 2) + t_quantile(0.8, 2)) / math.sqrt(3))


def test_paired_summary_scales_and_shifts():
    base = paired_summary([0.3, -0.1, 0.2, 0.0, 0.4])
    scaled = paired_summary([10 * d for d in (0.3, -0.1, 0.2, 0.0, 0.4)])
    assert scaled["sd"] == pytest.approx(10 * base["sd"]) and scaled["mde"] == pytest.approx(10 * base["mde"])
    assert scaled["p_value"] == pytest.approx(base["p_value"])
    assert paired_summary([1.0, -1.0, 1.0, -1.0])["p_value"] == pytest.approx(1.0)
    single = paired_summary([0.5])
    assert single["mean"] == 0.5 and math.isnan(single["sd"]) and math.isnan(single["mde"])
    constant = paired_summary([0.25, 0.25, 0.25])
    assert constant["sd"] == 0 and constant["p_value"] == 0.0 and constant["mde"] == 0.0
    with pytest.raises(ValueError):
        paired_summary([])


def test_pairwise_agreement_within_groups_only():
    truth = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert pairwise_agreement(truth * 2, truth, 3) == (1.0, 6)
    assert pairwise_agreement(-truth, truth, 3) == (0.0, 6)
    # scores that order each group right but the groups wrong against each other: still 1
    assert pairwise_agreement(torch.tensor([5.0, 6.0, 7.0, 0.0, 1.0, 2.0]), truth, 3) == (1.0, 6)
    # ties in the scores count one half; ties in the truth are not pairs
    assert pairwise_agreement(torch.zeros(6), truth, 3) == (0.5, 6)
    fraction, pairs = pairwise_agreement(torch.tensor([1.0, 0.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]), 2)
    assert math.isnan(fraction) and pairs == 0
    # one group of 4: truth 0,0,1,2 has 5 ordered pairs; scores get 4 of them right
    fraction, pairs = pairwise_agreement(torch.tensor([0.0, 3.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 1.0, 2.0]), 4)
    assert pairs == 5 and fraction == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        pairwise_agreement(torch.zeros(5), torch.zeros(5), 2)


def test_area_under():
    assert area_under([0, 4, 8], [0.3, 0.3, 0.3]) == pytest.approx(0.3)
    assert area_under([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert area_under([0, 2, 10], [0.0, 1.0, 1.0]) == pytest.approx((2 * 0.5 + 8 * 1.0) / 10)
    assert area_under([5], [0.7]) == 0.7
    with pytest.raises(ValueError):
        area_under([0, 1], [1.0])
