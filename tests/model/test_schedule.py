import math

import pytest

from r2m import omega


@pytest.mark.parametrize("total", [1, 7, 100])
@pytest.mark.parametrize("floor", [0.0, 0.6, 0.7])
def test_omega_endpoints_and_midpoint(total, floor):
    assert omega(0, total, floor) == 1.0  # the original RM's reward at step 0, exactly
    assert omega(total, total, floor) == floor  # cos(pi) = -1: the floor takes over
    assert omega(total / 2, total, floor) == pytest.approx(max(0.5, floor), abs=1e-12)


def test_omega_follows_the_cosine_until_the_floor():
    total, floor = 100, 0.6
    for t in range(total + 1):
        expected = max(0.5 * math.cos(math.pi * t / total) + 0.5, floor)
        assert omega(t, total, floor) == pytest.approx(expected, abs=1e-15)
    values = [omega(t, total, floor) for t in range(total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases
    assert omega(30, total, floor) > floor and omega(70, total, floor) == floor


def test_omega_clamps_steps_outside_the_run():
    assert omega(-5, 10, 0.6) == 1.0
    assert omega(10_000, 10, 0.6) == 0.6
    assert omega(11, 10, 0.0) == omega(10, 10, 0.0) == 0.0


@pytest.mark.parametrize("args, exc, word", [
    ((0, 0, 0.6), ValueError, "total_steps"),
    ((0, -3, 0.6), ValueError, "total_steps"),
    ((0, 2.5, 0.6), TypeError, "total_steps"),
    ((0, 10, 1.5), ValueError, "floor"),
    ((0, 10, -0.1), ValueError, "floor"),
    ((float("nan"), 10, 0.6), ValueError, "step"),
    (("3", 10, 0.6), TypeError, "step"),
])
def test_omega_rejects_bad_arguments(args, exc, word):
    with pytest.raises(exc, match=word):
        omega(*args)
