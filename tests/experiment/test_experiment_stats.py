"""The experiment's statistics on synthetic inputs with known answers: t quantiles, the paired
summary (mean, SD, SE, p-value, minimum detectable effect), within-group agreement, re-ranking
against the frozen RM, the head's attention statistics, the AUC, Holm's correction and the report's
primary family."""

import math

import pytest
import torch

from r2m.experiment.stats import area_under, holm, paired_summary, t_cdf, t_quantile
from r2m.metrics import (completion_attention_mass, max_attention_weight, pairwise_agreement, reranked_share,
                         shared_focus)


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
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)), abs=1e-3)
    assert s["untested"] is None


def test_paired_summary_scales_and_shifts():
    base = paired_summary([0.3, -0.1, 0.2, 0.0, 0.4])
    scaled = paired_summary([10 * d for d in (0.3, -0.1, 0.2, 0.0, 0.4)])
    assert scaled["sd"] == pytest.approx(10 * base["sd"]) and scaled["mde"] == pytest.approx(10 * base["mde"])
    assert scaled["p_value"] == pytest.approx(base["p_value"])
    assert paired_summary([1.0, -1.0, 1.0, -1.0])["p_value"] == pytest.approx(1.0)
    # too few seeds, or no spread: no p-value, interval or detectable effect, and a reason
    untested = {"single": paired_summary([0.5]), "two": paired_summary([0.1, 0.3]),
                "constant": paired_summary([0.25, 0.25, 0.25]), "zeros": paired_summary([0.0, 0.0])}
    for s in untested.values():
        assert all(math.isnan(s[k]) for k in ("p_value", "ci_low", "ci_high", "mde")) and s["untested"]
    assert untested["single"]["mean"] == 0.5 and math.isnan(untested["single"]["sd"])
    assert untested["two"]["sd"] == pytest.approx(math.sqrt(0.02)) and "2 seeds" in untested["two"]["untested"]
    assert untested["constant"]["sd"] == 0 and "no spread" in untested["constant"]["untested"]
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


def test_reranked_share():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 5.0, 0.0, 7.0])
    assert reranked_share(reference * 3 + 1, reference, 4) == 0.0  # same order
    assert reranked_share(-reference, reference, 4) == 1.0  # best and worst swapped in both groups
    # group 1: only the middle pair swaps (its ends kept); group 2: the best moves
    assert reranked_share(torch.tensor([1.0, 2.6, 2.5, 4.0, 6.0, 5.0, 0.0, 5.5]), reference, 4) == 0.5
    # group 1: only the worst moves
    assert reranked_share(torch.tensor([2.1, 2.0, 3.0, 4.0, 6.0, 5.0, 0.0, 7.0]), reference, 4) == 0.5
    with pytest.raises(ValueError):
        reranked_share(torch.zeros(4), torch.zeros(5), 2)


def test_completion_attention_mass_and_max_weight():
    weights = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.1, 0.2, 0.7]],
                            [[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])  # (B=2, n_h=2, S=4)
    completion = torch.tensor([[False, False, True, True], [False, True, True, False]])
    torch.testing.assert_close(completion_attention_mass(weights, completion),
                               torch.tensor([[0.25, 0.9], [0.0, 0.5]]))
    torch.testing.assert_close(max_attention_weight(weights), torch.tensor([[0.5, 0.7], [1.0, 0.25]]))


def focus_weights(positions, heads=1, seq_len=6):
    """(B, heads, S) weights of 0.6 on each row's given position(s), the rest spread evenly."""
    weights = torch.full((len(positions), heads, seq_len), 0.4 / (seq_len - 1))
    for b, per_head in enumerate(positions):
        for j, t in enumerate(per_head if isinstance(per_head, tuple) else (per_head,) * heads):
            weights[b, j, t] = 0.6
    return weights


def test_shared_focus_on_hand_built_groups():
    """Two groups of 3 rows over 6 positions: positions 0-1 a prompt every row of a group
    shares, 2-5 completions, distinct except where a test makes them shared."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 6, 5, generator=gen, dtype=torch.float64)
    hidden[1:3, :2] = hidden[0, :2]  # group 1's prompt
    hidden[4:6, :2] = hidden[3, :2]  # group 2's prompt
    mask = torch.ones(6, 6, dtype=torch.bool)

    def shared(positions, heads=1, h=hidden, m=mask, **kw):
        return shared_focus(focus_weights(positions, heads), h, m, 3, **kw).tolist()

    assert shared([0, 1, 0, 1, 1, 1]) == [True, True]  # every row on a prompt position
    assert shared([0, 1, 3, 1, 1, 1]) == [False, True]  # one row on its own completion
    assert shared([(0, 1), (1, 1), (0, 0), (4, 0), (0, 0), (0, 0)], heads=2) == [True, False]  # one head of one row
    # a completion prefix the whole group shares, at different columns in each row
    with_prefix = hidden.clone()
    with_prefix[4, 3], with_prefix[5, 5] = with_prefix[3, 2], with_prefix[3, 2]
    assert shared([0, 0, 0, 2, 3, 5], h=with_prefix) == [True, True]
    # ...unless one row holds it only at a masked position
    masked = mask.clone()
    masked[5, 5] = False
    assert shared([0, 0, 0, 2, 3, 2], h=with_prefix, m=masked) == [True, False]
    # equality to a relative tolerance in the Euclidean norm
    near = with_prefix.clone()
    near[5, 5] = near[3, 2] * (1 + 0.5e-2)
    assert shared([0, 0, 0, 2, 3, 5], h=near) == [True, True]
    assert shared([0, 0, 0, 2, 3, 5], h=near, rtol=1e-3) == [True, False]
    with pytest.raises(ValueError):
        shared_focus(torch.ones(4, 1, 6) / 6, hidden[:4], mask[:4], 3)


def test_run_metrics_gold_endpoints():
    """A run's held-out gold over the whole run and over its second half (steps >= T/2), and the
    training metrics' thirds over the scorings that logged them."""
    from r2m.experiment.report import run_metrics

    rows = [dict(step=t, gold=g, rm_reward=0.0, kl=0.0, length=3.0, agree_gold=0.5, rm_agree_gold=0.5,
                 agree_length=0.5, rm_agree_length=0.5) for t, g in ((0, 0.3), (4, 0.2), (8, 0.1), (12, 0.4))]
    train = [{"step": 1, "r2m/head_share": 0.0}, {"step": 2}, {"step": 3, "r2m/head_share": 0.3},
             {"step": 4, "r2m/head_share": 0.6}]
    m = run_metrics({"arm": "r2m", "seed": 0, "seconds": 1.0, "eval": rows, "train": train})
    assert m["gold_auc"] == pytest.approx((2 * 0.25 + 2 * 0.15 + 2 * 0.25) / 6)
    assert m["gold_second_half"] == pytest.approx((0.1 + 0.4) / 2)  # the evaluations at 8 and 12
    assert (m["train_head_share_first_third"], m["train_head_share_last_third"]) == (0.0, 0.6)
    assert m["train_head_share_run"] == pytest.approx(0.3)


def test_holm_known_answers():
    # m = 3: 0.01 -> 0.03; 0.03 -> max(0.03, 2 x 0.03) = 0.06; 0.04 -> max(0.06, 1 x 0.04) = 0.06
    h = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert {k: v["p_holm"] for k, v in h.items()} == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert [h[k]["reject"] for k in "abc"] == [True, False, False]
    # two tests: the smaller against alpha / 2, then the other against alpha
    assert all(v["reject"] for v in holm({"x": 0.02, "y": 0.04}).values())
    assert not any(v["reject"] for v in holm({"x": 0.03, "y": 0.04}).values())
    assert holm({"x": 0.6, "y": 0.7})["x"]["p_holm"] == 1.0  # capped at 1
    # an untested contrast stays in the family as p = 1: never rejected, the other still halved
    h = holm({"x": 0.02, "y": float("nan")})
    assert h["x"] == {"p_holm": pytest.approx(0.04), "reject": True}
    assert math.isnan(h["y"]["p_holm"]) and not h["y"]["reject"]
    assert not holm({"x": 0.03, "y": float("nan")})["x"]["reject"]
    assert holm({"only": 0.04}) == {"only": {"p_holm": 0.04, "reject": True}}
    assert holm({}) == {}


def synthetic_record(arm, seed, second_half_gold):
    """A run whose held-out gold is 0.3 at steps 0 and 4, then `second_half_gold` at 8 and 12."""
    rows = [dict(step=t, gold=g, rm_reward=0.0, kl=0.0, length=3.0, agree_gold=0.5, rm_agree_gold=0.5,
                 agree_length=0.5, rm_agree_length=0.5, digest="d")
            for t, g in ((0, 0.3), (4, 0.3), (8, second_half_gold), (12, second_half_gold))]
    return {"arm": arm, "seed": seed, "seconds": 1.0, "eval": rows, "train": [], "prompts": [["q"]]}


def test_summary_corrects_the_primary_family_with_holm():
    """The report's primary endpoint (gold over the second half): r2m - static and
    r2m - iterative-head, Holm-corrected together; the p-values are the paired t-tests'."""
    from r2m.experiment.report import PRIMARY_ENDPOINT, summarise, table

    static = [0.20, 0.22, 0.18, 0.21]
    r2m = [0.25, 0.26, 0.24, 0.23]  # clearly above static
    head = [0.24, 0.27, 0.22, 0.25]  # about r2m's level
    records = [synthetic_record(arm, seed, golds[seed]) for seed in range(4)
               for arm, golds in (("static", static), ("r2m", r2m), ("iterative-head", head))]
    summary = summarise(records, {"arms": ["static", "r2m", "iterative-head"]})
    assert summary["primary"]["endpoint"] == PRIMARY_ENDPOINT == "gold_second_half"
    p_static = paired_summary([a - b for a, b in zip(r2m, static)])["p_value"]
    p_head = paired_summary([a - b for a, b in zip(r2m, head)])["p_value"]
    assert p_static < 0.025 < 0.05 < p_head  # the test below is not vacuous
    h = summary["primary"]["holm"]
    assert list(h) == ["r2m − static", "r2m − iterative-head"]
    assert h["r2m − static"] == {"p_holm": pytest.approx(2 * p_static), "reject": True}
    assert h["r2m − iterative-head"] == {"p_holm": pytest.approx(p_head), "reject": False}
    text = table(summary)
    assert f"r2m − static             Holm-adjusted p {2 * p_static:.3f}: rejected (the arms differ)" in text
    assert f"Holm-adjusted p {p_head:.3f}: not rejected" in text
    # iterative-head - static is reported, but not in the corrected family
    assert "iterative-head − static" in text and "iterative-head − static" not in h


def test_set_up_described_without_a_static_arm():
    """--with_static false: the initial policy's held-out numbers come from step 0 of each seed's
    runs (every arm of a seed draws the same samples there), not n/a."""
    from r2m.experiment.report import summarise

    records = [synthetic_record(arm, seed, 0.2) for seed in range(2) for arm in ("r2m", "iterative-head")]
    for r in records:
        r["eval"][0]["gold"] = 0.1 + 0.2 * r["seed"]
    setup = summarise(records, {"arms": ["r2m", "iterative-head"]})["setup"]
    assert setup["initial_held_out"]["gold"] == pytest.approx(0.2) and setup["initial_held_out"]["length"] == 3.0
