"""The torch backend of grebt_loss against the float64 loop and finite differences."""

import pytest
import torch

from r2m import GREBTLoss
from r2m_kernels import grebt_loss
from tests.loops import grebt_loop


def uniform(batch, k):
    return [(i, i + k) for i in range(0, batch, k)]


def ragged(offsets):
    return list(zip(offsets[:-1], offsets[1:]))


def check_against_loop(rewards, groups, alpha, **kwargs):
    rewards = rewards.detach().double().requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        got = grebt_loss(rewards, alpha=alpha, reduction=reduction, backend="torch", **kwargs)
        per_group = grebt_loop(rewards, groups, alpha)
        want = {"mean": sum(per_group) / len(per_group), "sum": sum(per_group),
                "none": torch.stack(per_group)}[reduction]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g = torch.randn(got.shape, dtype=torch.float64)
        got_grad, = torch.autograd.grad((got * g).sum(), rewards)
        want_grad, = torch.autograd.grad((want * g).sum(), rewards)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(got_grad).all()


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_uniform_groups_match_the_loop(k, alpha):
    rewards = torch.randn(4 * k, dtype=torch.float64) * 2
    check_against_loop(rewards, uniform(4 * k, k), alpha, group_size=k)


def test_ragged_groups_match_the_loop():
    offsets = [0, 3, 4, 9, 11, 19]
    rewards = torch.randn(19, dtype=torch.float64)
    cu = torch.tensor(offsets, dtype=torch.int32)
    check_against_loop(rewards, ragged(offsets), 0.3, cu_groups=cu)


def test_ragged_with_equal_sizes_equals_uniform():
    rewards = torch.randn(24)
    cu = torch.arange(0, 25, 6, dtype=torch.int32)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(grebt_loss(rewards, cu_groups=cu, reduction=reduction),
                                   grebt_loss(rewards, 6, reduction=reduction))


def test_gradcheck_on_generic_groups():
    rewards = torch.randn(15, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 5, 12, 15], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda r: grebt_loss(r, cu_groups=cu, reduction="none"), (rewards,))
    assert torch.autograd.gradcheck(lambda r: grebt_loss(r, 5, alpha=0.7), (rewards,))


def test_ties_pick_the_first_index():
    # Two tied maxima: the pair is (first max, first min), so only those two get BT gradient.
    rewards = torch.tensor([0.0, 2.0, -1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss = grebt_loss(rewards, 5, alpha=0.0)
    grad, = torch.autograd.grad(loss, rewards)
    s = torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0, -s, s, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(torch.tensor(3.0, dtype=torch.float64))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_degenerate_groups_give_finite_zero_gradients(dtype):
    # K = 1 groups and all-equal groups: w = l (zero BT gradient), p one-hot or uniform (zero GRE
    # gradient), and no NaN from the std's derivative at zero.
    rewards = torch.tensor([1.5, -2.0, 3.0, 3.0, 3.0, 3.0], dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 1, 2, 6], dtype=torch.int32)
    losses = grebt_loss(rewards, cu_groups=cu, alpha=0.3, reduction="none")
    bt_equal = torch.log(torch.tensor(2.0))  # -log sigmoid(0)
    want = torch.stack([0.7 * bt_equal, 0.7 * bt_equal, 0.7 * bt_equal + 0.3 * torch.log(torch.tensor(4.0))])
    torch.testing.assert_close(losses.float(), want, rtol=1e-6, atol=1e-6)
    grad, = torch.autograd.grad(losses.sum(), rewards)
    assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("magnitude", [1e3, 1e4])
def test_large_rewards_stay_finite_and_accurate_in_fp32(magnitude):
    rewards64 = torch.randn(64, dtype=torch.float64) * magnitude
    rewards64[:8] = magnitude  # one all-equal group at the magnitude
    rewards32 = rewards64.float().requires_grad_(True)
    got = grebt_loss(rewards32, 8)
    want = grebt_loss(rewards32.detach().double().requires_grad_(True), 8)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(got, rewards32)
    assert torch.isfinite(grad).all()


def test_nearly_equal_group_has_finite_gradient():
    rewards = torch.tensor([1.0, 1.0 + 1e-7, 1.0, 1.0], dtype=torch.float32, requires_grad=True)
    grad, = torch.autograd.grad(grebt_loss(rewards, 4), rewards)
    assert torch.isfinite(grad).all()


def test_bt_pushes_the_pair_apart_and_gre_is_an_entropy():
    rewards = torch.tensor([0.1, 0.4, -0.3, 0.2], requires_grad=True)
    grad, = torch.autograd.grad(grebt_loss(rewards, 4, alpha=0.0), rewards)
    assert grad[1] < 0 < grad[2]  # gradient descent raises the max and lowers the min
    gre = grebt_loss(rewards, 4, alpha=1.0)
    assert 0 < gre.item() < torch.log(torch.tensor(4.0)).item()


def test_module_matches_function_and_16bit_rewards_give_fp32_loss():
    rewards = torch.randn(32).to(torch.bfloat16)
    module = GREBTLoss(alpha=0.4, eps=1e-5)
    out = module(rewards, 8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, grebt_loss(rewards, 8, alpha=0.4, eps=1e-5))
    assert GREBTLoss(reduction="none")(rewards, group_size=4).shape == (8,)
