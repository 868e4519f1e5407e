"""score_mix (docs/design.md §1.2: the reward from the attended vector without forming H_fin):
every backend (torch, triton, cuda: tests/support/backends.py; cuda runs the torch implementation)
against the paper's formula in float64, forward and the gradient of every input."""

import pytest
import torch

from r2m_kernels import score_mix
from r2m_kernels.triton import score_mix as triton_score_mix

from tests.support.backends import DEVICE, check_second_derivative, params

NAMES = ("attended", "rte", "out_weight", "score_weight", "score_bias")


def paper_formula(attended, rte, out_weight, score_weight, score_bias, omega):
    """phi(H_fin) with H_fin = (1 - omega) attended W_o^T + omega rte materialised, float64."""
    h_fin = (1 - omega) * attended.double() @ out_weight.double().T + omega * rte.double()
    reward = h_fin @ score_weight.double().T
    return (reward if score_bias is None else reward + score_bias.double()).squeeze(-1)


def random_inputs(batch, attn_dim, rm_dim, bias=True, rte_dtype=torch.float32):
    return [torch.randn(batch, attn_dim), torch.randn(batch, rm_dim).to(rte_dtype),
            torch.randn(rm_dim, attn_dim) / rm_dim ** 0.5, torch.randn(1, rm_dim) / rm_dim ** 0.5,
            torch.randn(1) if bias else None]


def run(backend, inputs, omega, grad_out, device, dtype=None, requires=NAMES):
    """Rewards and the gradients of the inputs named in `requires` (None for the others)."""
    leaves = []
    for name, t in zip(NAMES, inputs):
        if t is not None:
            t = t.to(device, dtype or t.dtype).requires_grad_(name in requires)
        leaves.append(t)
    if backend == "paper":
        rewards = paper_formula(*leaves, omega)
    else:
        rewards = score_mix(*leaves, omega=omega, backend=backend)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(rewards, wrt, grad_out.to(device, rewards.dtype)))
    return rewards, [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def check(backend, inputs, omega, requires=NAMES, rtol=1e-5):
    """`backend` vs the paper's formula in float64; docs/design.md §5: error at most 2x the
    torch backend's own error in the same dtypes (for the torch backend itself: one rounding
    to the result's dtype), plus rtol times the largest reference value."""
    grad_out = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    ref, ref_grads = run("paper", inputs, omega, grad_out, "cpu", torch.float64, requires)
    fast, fast_grads = run(backend, inputs, omega, grad_out, DEVICE, requires=requires)
    eager, eager_grads = run("torch", inputs, omega, grad_out, "cpu", requires=requires)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    pairs = [("rewards", fast, eager, ref)] + list(zip(NAMES, fast_grads, eager_grads, ref_grads))
    for name, got, base, want in pairs:
        if want is None:
            assert got is None, name
            continue
        source = inputs[NAMES.index(name)] if name != "rewards" else fast
        assert got.dtype == source.dtype and got.shape == want.shape, name
        err = (got.cpu().double() - want).abs().max()
        if backend == "torch":
            own = torch.finfo(got.dtype).eps * want.abs().max()
        else:
            own = 2 * (base.double() - want).abs().max()
        bound = own + rtol * want.abs().max() + 1e-12
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("omega", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 45, 70), (5, 96, 129)])
def test_matches_the_paper_formula_in_float64(shape, omega, backend):
    check(backend, random_inputs(*shape), omega)


def test_without_bias_and_with_frozen_inputs(backend):
    check(backend, random_inputs(9, 33, 65, bias=False), 0.6)
    check(backend, random_inputs(9, 33, 65), 0.6, requires=("attended", "out_weight", "score_weight"))
    check(backend, random_inputs(9, 33, 65), 0.6, requires=("attended", "rte"))
    check(backend, random_inputs(9, 33, 65), 0.6, requires=("score_weight", "score_bias"))


def test_16bit_strided_rte(backend):
    inputs = random_inputs(11, 40, 72, rte_dtype=torch.float16)
    wide = torch.randn(11, 3, 72).to(torch.float16)
    wide[:, 1] = inputs[1]
    inputs[1] = wide[:, 1]  # rows with stride 3 * 72, as a slice of a hidden-state tensor
    assert not inputs[1].is_contiguous()
    check(backend, inputs, 0.4)


def test_reference_is_the_paper_formula():
    inputs = [t.double() if t is not None else None for t in random_inputs(7, 13, 21)]
    grad_out = torch.randn(7, dtype=torch.float64)
    got, got_grads = run("torch", inputs, 0.3, grad_out, "cpu")
    want, want_grads = run("paper", inputs, 0.3, grad_out, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(NAMES, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck(backend):
    # fp64 inputs run the kernels' math in fp64; fast mode (random projections) keeps the
    # number of interpreted launches small.
    inputs = tuple(t.double().to(DEVICE).requires_grad_(True) for t in random_inputs(3, 5, 7))
    assert torch.autograd.gradcheck(lambda *x: score_mix(*x, omega=0.45, backend=backend), inputs,
                                    fast_mode=True)


def test_second_derivative_is_right_or_a_clear_error(backend):
    inputs = tuple(t.double().to(DEVICE).requires_grad_(True) for t in random_inputs(3, 4, 6))
    check_second_derivative("score_mix", backend, lambda *x: score_mix(*x, omega=0.3, backend=backend),
                            inputs)


def test_every_output_element_is_written(monkeypatch, backend):
    # Buffers come from torch.empty: poison them so an element the kernels skip shows as NaN.
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    check(backend, random_inputs(35, 33, 65), 0.6)
    check(backend, random_inputs(35, 33, 65), 0.6, requires=("rte", "score_weight"))


@pytest.mark.parametrize("backend_name", params(["triton"]))
def test_triton_op_registration(backend_name):
    inputs = [t.to(DEVICE).requires_grad_(True) for t in random_inputs(5, 7, 9)]
    torch.library.opcheck(triton_score_mix._score_mix_op, (*inputs, 0.3))


@pytest.mark.gpu
def test_gpu_paper_width_against_float64():
    check("triton", random_inputs(64, 2048, 4096), 0.6, rtol=1e-5)
    check("triton", random_inputs(64, 2048, 4096, rte_dtype=torch.bfloat16), 0.6, rtol=1e-5)
