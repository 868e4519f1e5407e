"""grebt_loss (docs/design.md §1.3): the torch backend (the reference) against the float64 loop
of tests/support/loops.py and finite differences, then every backend (torch, triton, cuda:
tests/support/backends.py) against the float64 reference on uniform, ragged, degenerate, tied, large
and strided groups, under the error rule of §5."""

import pytest
import torch

from r2m import GREBTLoss
from r2m_kernels import BackendUnavailableError, grebt_loss
from r2m_kernels.cuda import grebt as cuda_grebt
from r2m_kernels.triton import grebt as triton_grebt

from tests.support.backends import DEVICE, check_second_derivative, params, use
from tests.support.loops import grebt_loop

REDUCTIONS = ("mean", "sum", "none")


def random_groups(sizes, scale=2.0):
    """Rewards for ragged groups of `sizes` and their (G+1,) int32 offsets."""
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(sizes), 0)
    return torch.randn(int(cu[-1]), dtype=torch.float64) * scale, cu


# ------------------------------------------------------- the reference against the loop

def check_against_loop(rewards, groups, alpha, **kwargs):
    """The torch backend in float64 against grebt_loop, loss and gradient, every reduction."""
    rewards = rewards.detach().double().requires_grad_(True)
    for reduction in REDUCTIONS:
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
def test_reference_uniform_groups_match_the_loop(k, alpha):
    rewards = torch.randn(4 * k, dtype=torch.float64) * 2
    check_against_loop(rewards, [(i, i + k) for i in range(0, 4 * k, k)], alpha, group_size=k)


def test_reference_ragged_groups_match_the_loop():
    offsets = [0, 3, 4, 9, 11, 19]
    rewards = torch.randn(19, dtype=torch.float64)
    cu = torch.tensor(offsets, dtype=torch.int32)
    check_against_loop(rewards, list(zip(offsets[:-1], offsets[1:])), 0.3, cu_groups=cu)


def test_reference_gradcheck_on_generic_groups():
    rewards = torch.randn(15, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 5, 12, 15], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda r: grebt_loss(r, cu_groups=cu, reduction="none"), (rewards,))
    assert torch.autograd.gradcheck(lambda r: grebt_loss(r, 5, alpha=0.7), (rewards,))


def test_reference_degenerate_groups_have_the_closed_form_loss():
    # K = 1 and all-equal groups: BT = -log sigmoid(0) = log 2, and an entropy of 0 (one-hot
    # p) or log K (uniform p).
    rewards = torch.tensor([1.5, -2.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    cu = torch.tensor([0, 1, 2, 6], dtype=torch.int32)
    losses = grebt_loss(rewards, cu_groups=cu, alpha=0.3, reduction="none")
    log2, log4 = torch.log(torch.tensor(2.0, dtype=torch.float64)), torch.log(torch.tensor(4.0, dtype=torch.float64))
    torch.testing.assert_close(losses, torch.stack([0.7 * log2, 0.7 * log2, 0.7 * log2 + 0.3 * log4]))


def test_bt_pushes_the_pair_apart_and_gre_is_an_entropy():
    rewards = torch.tensor([0.1, 0.4, -0.3, 0.2], requires_grad=True)
    grad, = torch.autograd.grad(grebt_loss(rewards, 4, alpha=0.0), rewards)
    assert grad[1] < 0 < grad[2]  # gradient descent raises the max and lowers the min
    gre = grebt_loss(rewards, 4, alpha=1.0)
    assert 0 < gre.item() < torch.log(torch.tensor(4.0)).item()


# ------------------------------------------------------- every backend against float64

def check_against_reference(rewards64, backend, *, rtol=1e-5, dtype=torch.float32, **kwargs):
    """`backend` on rewards64 cast to `dtype` vs the torch reference in float64 on the same
    (rounded) values: losses and gradients for every reduction, with a random grad_output.

    docs/design.md §5: the error against float64 may be at most 2x the torch reference's own
    error in the same dtype (for the torch backend itself: one rounding to the result's
    dtype), plus rtol times the
    largest reference value, plus 1e-7 of the gradient's natural scale (grad_output per
    group): fp32 rounding of O(1) per-group terms. That floor matters only where the true
    gradient is far below its terms, e.g. the entropy gradient of K = 2, which is a pure
    eps / std effect."""
    rounded = rewards64.to(dtype)
    groups = (len(kwargs["cu_groups"]) - 1 if "cu_groups" in kwargs
              else rewards64.numel() // kwargs["group_size"])
    for reduction in REDUCTIONS:
        results = {}
        for name, run_on, device, acc in (("fast", backend, DEVICE, dtype),
                                           ("eager", "torch", "cpu", dtype),
                                           ("ref", "torch", "cpu", torch.float64)):
            x = rounded.to(device, acc).requires_grad_(True)
            loss = grebt_loss(x, reduction=reduction, backend=run_on, **_on(kwargs, device))
            if "grad_out" not in results:
                results["grad_out"] = torch.randn(loss.shape, dtype=torch.float64)
            grad, = torch.autograd.grad(loss, x, results["grad_out"].to(device, loss.dtype))
            results[name] = (loss, grad)
        (loss, grad), (ref_loss, _) = results["fast"], results["ref"]
        assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
        assert grad.dtype == dtype and torch.isfinite(grad).all() and torch.isfinite(loss).all()
        for i, what in enumerate(("loss", "gradient")):
            ref = results["ref"][i]
            err = (results["fast"][i].cpu().double() - ref).abs().max()
            if backend == "torch":  # the reference itself: one rounding to the result's dtype
                base = torch.finfo(results["fast"][i].dtype).eps * ref.abs().max()
            else:
                base = 2 * (results["eager"][i].double() - ref).abs().max()
            natural = float(results["grad_out"].abs().max()) / (groups if reduction == "mean" else 1)
            bound = base + rtol * ref.abs().max() + (1e-7 * natural if what == "gradient" else 0)
            assert err <= bound, f"{reduction} {what}: error {err:.3g} > bound {bound:.3g}"


def _on(kwargs, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


@pytest.mark.parametrize("k", [1, 2, 3, 8, 37, 130])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_uniform_groups_match_float64(k, alpha, backend):
    groups = 5 if k < 100 else 2
    rewards = torch.randn(groups * k, dtype=torch.float64) * 2
    check_against_reference(rewards, backend, group_size=k, alpha=alpha)


def test_many_small_groups_span_several_programs(backend):
    rewards = torch.randn(8 * 37, dtype=torch.float64)  # 37 groups of 8: tiles with a ragged tail
    check_against_reference(rewards, backend, group_size=8, alpha=0.3, eps=1e-4)


def test_ragged_groups_match_float64(backend):
    rewards, cu = random_groups([3, 1, 5, 2, 8, 1, 13, 4, 6])
    check_against_reference(rewards, backend, cu_groups=cu, alpha=0.3)


def test_a_group_of_1024_beside_small_ones_matches_float64(backend):
    rewards, cu = random_groups([1024, 7, 300])
    check_against_reference(rewards, backend, cu_groups=cu, alpha=0.5)


def test_ragged_with_equal_sizes_equals_uniform(backend):
    rewards = torch.randn(24, device=DEVICE)
    cu = torch.arange(0, 25, 6, dtype=torch.int32, device=DEVICE)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(grebt_loss(rewards, cu_groups=cu, reduction=reduction, backend=backend),
                                   grebt_loss(rewards, 6, reduction=reduction, backend=backend))


@pytest.mark.interpreter
def test_triton_fp64_rewards_pass_gradcheck_through_the_kernel():
    # fp64 rewards run the kernel's math in fp64, so finite differences check the hand-derived
    # gradient itself (fp32 is checked against the reference above).
    rewards, cu = random_groups([4, 1, 3, 2])
    rewards = rewards.to(DEVICE).requires_grad_(True)
    cu = cu.to(DEVICE)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda r: grebt_loss(r, cu_groups=cu, reduction=reduction, backend="triton"), (rewards,),
            atol=1e-9, rtol=1e-6)
    for reduction in REDUCTIONS:  # and it agrees with the fp64 reference to rounding
        got = grebt_loss(rewards, cu_groups=cu, reduction=reduction, backend="triton")
        want = grebt_loss(rewards.cpu(), cu_groups=cu.cpu(), reduction=reduction, backend="torch")
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
        grad_out = torch.randn(want.shape, dtype=torch.float64)
        got_grad, = torch.autograd.grad(got, rewards, grad_out.to(DEVICE))
        want_grad, = torch.autograd.grad(want, rewards, grad_out)
        torch.testing.assert_close(got_grad.cpu(), want_grad.cpu(), rtol=1e-9, atol=1e-14)
    uniform = rewards[:8].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r: grebt_loss(r, 4, alpha=0.7, backend="triton"), (uniform,),
                                   atol=1e-9, rtol=1e-6)


def test_ties_pick_the_first_max_and_min(backend):
    # Two tied maxima: the pair is (first max, first min), so only those two get BT gradient.
    rewards = torch.tensor([0.0, 2.0, -1.0, 2.0, -1.0], device=DEVICE, requires_grad=True)
    loss = grebt_loss(rewards, 5, alpha=0.0, backend=backend)
    grad, = torch.autograd.grad(loss, rewards)
    s = torch.sigmoid(torch.tensor(-3.0))
    torch.testing.assert_close(grad.cpu(), torch.tensor([0.0, -s, s, 0.0, 0.0]))
    torch.testing.assert_close(loss.cpu(), -torch.log(torch.sigmoid(torch.tensor(3.0))))
    check_against_reference(torch.tensor([1.0, 3.0, 3.0, -2.0, 1.0, -2.0], dtype=torch.float64),
                            backend, group_size=6, alpha=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_degenerate_groups_give_finite_zero_gradients(dtype, backend):
    # K = 1 and all-equal groups: w = l (zero BT gradient), uniform or one-hot p (zero GRE
    # gradient), std = 0 with a zero std gradient.
    rewards = torch.tensor([1.5, -2.0, 3.0, 3.0, 3.0, 3.0], dtype=dtype, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 1, 2, 6], dtype=torch.int32, device=DEVICE)
    if backend == "cuda" and dtype == torch.float64:  # not a cuda dtype: a clear error (§7)
        with pytest.raises(BackendUnavailableError, match="float64"):
            grebt_loss(rewards, cu_groups=cu, backend=backend)
        return
    got = grebt_loss(rewards, cu_groups=cu, alpha=0.3, reduction="none", backend=backend)
    want = grebt_loss(rewards.detach().cpu().double(), cu_groups=cu.cpu(), alpha=0.3, reduction="none",
                      backend="torch")
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-6, atol=1e-7)
    grad, = torch.autograd.grad(got.sum(), rewards)
    assert torch.isfinite(grad).all() and (grad == 0).all()
    single, = torch.autograd.grad(grebt_loss(rewards, 1, backend=backend), rewards)
    assert (single == 0).all()


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_rewards_stay_finite_and_accurate(magnitude, backend):
    rewards = torch.randn(48, dtype=torch.float64) * magnitude
    rewards[:8] = magnitude  # an all-equal group at the magnitude
    rewards[8:16] = magnitude + torch.arange(8, dtype=torch.float64)  # nearly equal
    check_against_reference(rewards, backend, group_size=8, alpha=0.3)


def test_nearly_equal_group_has_finite_gradient(backend):
    rewards = torch.tensor([1.0, 1.0 + 1e-7, 1.0, 1.0], device=DEVICE, requires_grad=True)
    grad, = torch.autograd.grad(grebt_loss(rewards, 4, backend=backend), rewards)
    assert torch.isfinite(grad).all()


def test_bt_only_keeps_relative_accuracy_on_a_wide_gap(backend):
    # softplus(r_l - r_w) ~ exp(-30): log(1 + x) must not round it to 0.
    rewards = torch.tensor([0.0, 30.0, 10.0, 20.0], dtype=torch.float64)
    check_against_reference(rewards, backend, group_size=4, alpha=0.0)


def test_eps_beyond_fp32_range_stays_finite(backend):
    check_against_reference(torch.randn(12, dtype=torch.float64), backend, group_size=4, eps=1e39)


# ------------------------------------------------------- rewards of any finite magnitude

FP32_MAX = torch.finfo(torch.float32).max


def groups_at(magnitude):
    """Float64 rewards exact in float32, in ragged groups at `magnitude` (up to float32's
    largest) beside ordinary ones, and their (G+1,) int32 offsets. At 3e38 the first group's
    sum and its r_w - r_l overflow float32."""
    m = magnitude
    groups = [
        [m, 2 * m / 3, -m, m / 3],
        (torch.randn(5, dtype=torch.float64) * 2).tolist(),  # ordinary rewards
        [m] * 3,  # equal rewards: std 0
        [-m],  # K = 1
        [m * (1 - k / 8) for k in range(4)],  # all near the magnitude: the sum overflows
        [m, 1.0, -0.5, 1e-30, -m / 7],  # one huge reward beside small ones
        [-m / 4, -m, -m / 2],
    ]
    cu = torch.tensor([0] + [len(g) for g in groups], dtype=torch.int32).cumsum(0).to(torch.int32)
    return torch.tensor([x for g in groups for x in g], dtype=torch.float64).float().double(), cu


def assert_close_per_group(got, want, cu, rtol, spacing, what):
    """Each group's entries of got within rtol of the group's own largest |want| plus `spacing`
    (absolute): gradients of groups at different magnitudes are orders apart (~1 / magnitude),
    so one bound for the whole batch would not see the small ones."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    for g, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        err = (got[lo:hi] - want[lo:hi]).abs().max().item()
        bound = rtol * want[lo:hi].abs().max().item() + spacing
        assert err <= bound, f"{what}, group {g}: error {err:.3g} > bound {bound:.3g}"


def test_reference_matches_the_loop_at_float32s_largest_rewards():
    # In float64 nothing overflows at 3.4e38: the loop is a plain reference there.
    rewards, cu = groups_at(FP32_MAX)
    rewards.requires_grad_(True)
    pairs = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    got = grebt_loss(rewards, cu_groups=cu, alpha=0.3, reduction="none", backend="torch")
    want = torch.stack(grebt_loop(rewards, pairs, 0.3))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grad_out = torch.rand(len(pairs), dtype=torch.float64) + 0.5
    got_grad, = torch.autograd.grad(got, rewards, grad_out)
    want_grad, = torch.autograd.grad(want, rewards, grad_out)
    assert_close_per_group(got_grad, want_grad, cu, 1e-9, 0.0, "gradient")


@pytest.mark.parametrize("magnitude", [1e30, 1e36, 3e38, "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rewards_up_to_float32s_largest_match_float64(magnitude, dtype, backend):
    """Finite rewards of any magnitude: a finite loss and gradient, each group within rtol of the
    float64 reference on the same rounded values. The gradients of a group at 3e38 are ~1e-40,
    below float32's normal range: one subnormal spacing more (on the GPU, where fast math may
    flush them to zero, float32's smallest normal)."""
    info = torch.finfo(dtype)
    rewards64, cu = groups_at(info.max if magnitude == "max" else magnitude)
    rounded = rewards64.to(dtype)
    spacing = info.tiny if DEVICE.type == "cuda" else info.tiny * info.eps
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    x = rounded.to(DEVICE).requires_grad_(True)
    loss = grebt_loss(x, cu_groups=cu.to(DEVICE), alpha=0.3, reduction="none", backend=backend)
    ref_x = rounded.double().requires_grad_(True)
    ref = grebt_loss(ref_x, cu_groups=cu, alpha=0.3, reduction="none", backend="torch")
    grad_out = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    grad, = torch.autograd.grad(loss, x, grad_out.to(DEVICE, loss.dtype))
    ref_grad, = torch.autograd.grad(ref, ref_x, grad_out)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=0)
    assert_close_per_group(grad, ref_grad, cu, rtol, spacing, "gradient")
    assert (grad[9:13] == 0).all()  # the equal group and K = 1: no gradient at all
    total = grebt_loss(x, cu_groups=cu.to(DEVICE), alpha=0.3, backend=backend)  # "mean"
    torch.testing.assert_close(total.cpu().double(), ref.mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_the_entropy_term_is_scale_free_to_the_bit(dtype, backend):
    """GRE (alpha = 1) of rewards r 2^k with eps 2^k is that of r with eps, and its gradient is
    2^-k times: the scaled rewards are standardised in the same units as r. fp64 rewards near
    1e301 (the triton kernel and the reference scale in fp64 too; the kernel takes eps within
    float32's range)."""
    base_power, k, eps = (0, 100, 1e-6) if dtype == torch.float32 else (800, 200, 2.0**-100)
    base = torch.randn(24, dtype=dtype, device=DEVICE) * 2.0**base_power
    base[8:12] = 1.5 * 2.0**base_power  # equal rewards
    cu = torch.tensor([0, 5, 8, 12, 13, 24], dtype=torch.int32, device=DEVICE)
    if backend == "cuda" and dtype == torch.float64:
        with pytest.raises(BackendUnavailableError, match="float64"):
            grebt_loss(base, cu_groups=cu, backend=backend)
        return
    results = []
    for power in (0, k):
        x = (base * 2.0**power).requires_grad_(True)
        loss = grebt_loss(x, cu_groups=cu, alpha=1.0, eps=eps * 2.0**power, reduction="none", backend=backend)
        grad, = torch.autograd.grad(loss.sum(), x)
        results.append((loss, grad * 2.0**power))
    (loss, grad), (scaled_loss, scaled_grad) = results
    assert torch.isfinite(scaled_loss).all() and torch.isfinite(scaled_grad).all()
    exact = backend == "torch" or DEVICE.type == "cpu"  # GPU kernels divide approximately
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled_loss, loss, **tol)
    torch.testing.assert_close(scaled_grad, grad, **tol)


@pytest.mark.parametrize("rewards, eps", [(1e-30, 1e30), (FP32_MAX, torch.finfo(torch.float32).tiny)],
                         ids=["eps-over-s-overflows", "eps-over-s-underflows"])
def test_eps_far_from_the_rewards_scale(rewards, eps, backend):
    # eps / 2^e beyond float32's range either way is kept within it: equal groups stay 0 / eps,
    # and the others match float64.
    values = torch.tensor([1.0, 1.0, 1.0, -0.25, 0.5, 1.0, 0.75, 0.125], dtype=torch.float64) * rewards
    check_against_reference(values.float().double(), backend, group_size=4, alpha=0.3, eps=eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_rewards(dtype, backend):
    check_against_reference(torch.randn(48, dtype=torch.float64), backend, group_size=4, dtype=dtype)


def test_strided_rewards_with_and_without_grad(backend):
    base = torch.randn(48, dtype=torch.float64)
    strided = base.float().to(DEVICE)[::2].requires_grad_(True)  # 24 rewards, stride 2
    reference = base[::2].float().double().requires_grad_(True)
    grad_out = torch.randn(4, dtype=torch.float64)
    got = grebt_loss(strided, 6, reduction="none", backend=backend)
    want = grebt_loss(reference, 6, reduction="none", backend="torch")
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    got_grad, = torch.autograd.grad(got, strided, grad_out.to(DEVICE, torch.float32))
    want_grad, = torch.autograd.grad(want, reference, grad_out)
    torch.testing.assert_close(got_grad.cpu().double(), want_grad, rtol=1e-5, atol=1e-7)
    without = grebt_loss(strided.detach(), 6, reduction="none", backend=backend)
    assert without.grad_fn is None
    torch.testing.assert_close(without, got.detach())


def test_module_uses_the_backend(backend):
    rewards = torch.randn(24, device=DEVICE)
    module = GREBTLoss(alpha=0.4, eps=1e-5, backend=backend)
    torch.testing.assert_close(module(rewards, 8).cpu(),
                               grebt_loss(rewards.cpu(), 8, alpha=0.4, eps=1e-5, backend="torch"))
    assert GREBTLoss(reduction="none", backend=backend)(rewards, group_size=4).shape == (6,)


def test_a_group_beyond_the_kernels_limit_is_a_clear_error(compiled_backend):
    limit = {"triton": triton_grebt.MAX_GROUP_SIZE, "cuda": cuda_grebt.MAX_GROUP_SIZE}[compiled_backend]
    rewards = torch.zeros(limit + 1, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="groups of up to"):
        grebt_loss(rewards, rewards.numel(), backend=compiled_backend)


def test_every_output_element_is_written(monkeypatch, backend):
    # triton's buffers come from torch.empty: poison them so an element the kernel skips shows
    # as NaN. The cuda binding allocates in C++: there, fill and free a block first, which the
    # caching allocator hands out again for the small outputs.
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    if DEVICE.type == "cuda":
        torch.full((1 << 16,), float("nan"), device="cuda")  # freed at once, memory stays cached
    rewards, cu = random_groups([3, 1, 9, 2, 17])
    check_against_reference(rewards, backend, cu_groups=cu, alpha=0.3)
    check_against_reference(rewards[:30], backend, group_size=3, alpha=0.3)


@pytest.mark.parametrize("k", [8, 100, 600])
def test_gradient_sums_to_zero_when_the_spread_is_near_the_rounding_of_the_mean(k, backend):
    """The loss is invariant to adding a constant to a group, so its gradient sums to 0 over
    each group. Rewards 1 + 1e-6 randn have a spread of ~8 ulps of their mean: a single fp32
    centring leaves a shift of ~1 ulp in every centred reward, enough to break that sum."""
    rewards = (1.0 + 1e-6 * torch.randn(4 * k, dtype=torch.float64)).float().to(DEVICE)
    rewards.requires_grad_(True)
    grad, = torch.autograd.grad(grebt_loss(rewards, k, alpha=1.0, backend=backend), rewards)
    per_group = grad.view(4, k).double()
    assert torch.isfinite(per_group).all()
    assert (per_group.sum(1).abs() <= 1e-4 * per_group.abs().max()).all()


# ------------------------------------------------------- strided offsets, second derivatives

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_strided_cu_groups(reduction, backend):
    """cu_groups taken with a stride give the result of the same offsets made contiguous
    (§8: any stride is accepted), loss and gradient, against float64."""
    interleaved = torch.tensor([0, 9, 3, 9, 4, 9, 9, 9, 11, 9], dtype=torch.int32, device=DEVICE)
    strided = interleaved[::2]
    assert not strided.is_contiguous()
    rewards64 = torch.randn(11, dtype=torch.float64) * 2
    rewards = rewards64.float().to(DEVICE).requires_grad_(True)
    got = grebt_loss(rewards, cu_groups=strided, reduction=reduction, backend=backend)
    grad_out = torch.randn(got.shape, dtype=torch.float64)
    got_grad, = torch.autograd.grad(got, rewards, grad_out.to(DEVICE, got.dtype))
    ref = rewards.detach().cpu().double().requires_grad_(True)
    want = grebt_loss(ref, cu_groups=strided.cpu().contiguous(), reduction=reduction, backend="torch")
    want_grad, = torch.autograd.grad(want, ref, grad_out)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.cpu().double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [{"group_size": 4}, {"cu_groups": [0, 3, 4, 8]}], ids=["uniform", "ragged"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_derivative_is_right_or_a_clear_error(groups, reduction, backend):
    groups = {k: torch.tensor(v, dtype=torch.int32, device=DEVICE) if isinstance(v, list) else v
              for k, v in groups.items()}
    rewards = (torch.randn(8, dtype=torch.float64, device=DEVICE) * 2).requires_grad_(True)
    check_second_derivative("grebt_loss", backend,
                            lambda r: grebt_loss(r, alpha=0.4, reduction=reduction, backend=backend, **groups),
                            (rewards,))


# ------------------------------------------------------- the compiled ops

@pytest.mark.parametrize("backend_name", params(["cuda"]))
def test_cuda_op_registration(backend_name, monkeypatch):
    """Schema, fake implementation and autograd of the cuda op (torch.library.opcheck); the
    triton op's are exercised by test_head.py's torch.compile test."""
    use(backend_name, monkeypatch)
    op = cuda_grebt._grebt_op
    rewards = torch.randn(24, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 24], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(op, (rewards, None, cu, 18, 0.3, 1e-6, "none", True))


@pytest.mark.slow
def test_torch_backend_under_inductor_matches_eager():
    """torch.compile (inductor) of the torch backend: loss and gradient as in eager, huge groups
    included. The pair's BT term is a one-hot product because inductor (torch 2.13, CPU) lost
    the gradient at l of a gather-based one here."""
    ragged, cu = groups_at(3e38)
    uniform = torch.tensor([3e38, 2e38, -3e38, 1e38, 1.0, 2.0, 0.5, -1.0, 0.3, 0.3, 0.3, 0.3])
    for rewards, groups in ((uniform, {"group_size": 4}), (ragged, {"cu_groups": cu.to(DEVICE)})):
        rewards = rewards.float().to(DEVICE).requires_grad_(True)
        compiled = torch.compile(lambda r: grebt_loss(r, reduction="none", backend="torch", **groups),
                                 fullgraph=True)
        got = compiled(rewards)
        grad_out = torch.rand(got.shape, device=DEVICE) + 0.5
        got_grad, = torch.autograd.grad(got, rewards, grad_out)
        want = grebt_loss(rewards, reduction="none", backend="torch", **groups)
        want_grad, = torch.autograd.grad(want, rewards, grad_out)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        offsets = cu if "cu_groups" in groups else torch.arange(0, 13, 4)
        assert_close_per_group(got_grad, want_grad, offsets, 1e-5, torch.finfo(torch.float32).tiny, "gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_gpu_matches_float64_at_scale(backend_name):
    rewards = torch.randn(16384 * 8, dtype=torch.float64)
    check_against_reference(rewards, backend_name, group_size=8, alpha=0.3)
    check_against_reference(rewards[: 64 * 8], backend_name, group_size=8, alpha=0.3, dtype=torch.bfloat16)
