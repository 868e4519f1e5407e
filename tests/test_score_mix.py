"""score_mix (the reward from the attended vector without forming H_fin) against the paper's
formula in float64, its gradients, and its use in R2MHead.forward."""

import pytest
import torch

from r2m import R2MHead
from r2m_kernels import score_mix
from tests.loops import r2m_head_loop

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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


def check_triton(inputs, omega, requires=NAMES, rtol=1e-5):
    """Triton vs the paper's formula in float64; DESIGN §5: error at most 2x the torch
    backend's own error in the same dtypes, plus rtol times the largest reference value."""
    grad_out = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    ref, ref_grads = run("paper", inputs, omega, grad_out, "cpu", torch.float64, requires)
    fast, fast_grads = run("triton", inputs, omega, grad_out, DEVICE, requires=requires)
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
        bound = 2 * (base.double() - want).abs().max() + rtol * want.abs().max() + 1e-12
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("omega", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 45, 70), (5, 96, 129)])
def test_triton_matches_the_paper_formula_in_float64(shape, omega):
    check_triton(random_inputs(*shape), omega)


def test_without_bias_and_with_frozen_inputs():
    check_triton(random_inputs(9, 33, 65, bias=False), 0.6)
    check_triton(random_inputs(9, 33, 65), 0.6, requires=("attended", "out_weight", "score_weight"))
    check_triton(random_inputs(9, 33, 65), 0.6, requires=("attended", "rte"))
    check_triton(random_inputs(9, 33, 65), 0.6, requires=("score_weight", "score_bias"))


def test_16bit_strided_rte():
    inputs = random_inputs(11, 40, 72, rte_dtype=torch.float16)
    wide = torch.randn(11, 3, 72).to(torch.float16)
    wide[:, 1] = inputs[1]
    inputs[1] = wide[:, 1]  # rows with stride 3 * 72, as a slice of a hidden-state tensor
    assert not inputs[1].is_contiguous()
    check_triton(inputs, 0.4)


def test_torch_reference_is_the_paper_formula():
    inputs = [t.double() if t is not None else None for t in random_inputs(7, 13, 21)]
    grad_out = torch.randn(7, dtype=torch.float64)
    got, got_grads = run("torch", inputs, 0.3, grad_out, "cpu")
    want, want_grads = run("paper", inputs, 0.3, grad_out, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(NAMES, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck(backend):
    device = "cpu" if backend == "torch" else DEVICE
    # fp64 inputs run the kernels' math in fp64; fast mode (random projections) keeps the
    # number of interpreted launches small.
    inputs = tuple(t.double().to(device).requires_grad_(True) for t in random_inputs(3, 5, 7))
    assert torch.autograd.gradcheck(lambda *x: score_mix(*x, omega=0.45, backend=backend), inputs,
                                    fast_mode=True)


def test_bad_inputs_name_the_argument():
    attended, rte, out_weight, score_weight, score_bias = random_inputs(4, 6, 8)
    with pytest.raises(ValueError, match="rte"):
        score_mix(attended, rte[:3], out_weight, score_weight, score_bias, omega=0.5)
    with pytest.raises(ValueError, match="out_weight"):
        score_mix(attended, rte, out_weight.T, score_weight, score_bias, omega=0.5)
    with pytest.raises(ValueError, match="score_weight"):
        score_mix(attended, rte, out_weight, score_weight[0], score_bias, omega=0.5)
    with pytest.raises(ValueError, match="score_bias"):
        score_mix(attended, rte, out_weight, score_weight, torch.zeros(2), omega=0.5)
    with pytest.raises(ValueError, match="omega"):
        score_mix(attended, rte, out_weight, score_weight, score_bias, omega=1.5)
    with pytest.raises(TypeError, match="attended"):
        score_mix(attended.int(), rte, out_weight, score_weight, score_bias, omega=0.5)
    with pytest.raises(ValueError, match="attended"):  # d = 0: no chunk would add the bias
        score_mix(attended[:, :0], rte, out_weight[:, :0], score_weight, score_bias, omega=0.5)
    with pytest.raises(ValueError, match="attended"):
        score_mix(attended[:0], rte[:0], out_weight, score_weight, score_bias, omega=0.5)


def make_head(backend, rm_dim=24, policy_dim=20, attn_dim=16, heads=2):
    torch.manual_seed(1)
    return R2MHead(rm_dim, policy_dim, attn_dim=attn_dim, num_heads=heads, total_steps=10,
                   backend=backend).to(DEVICE)


def head_params(head):
    return {"W_q": head.q_proj.weight.T, "W_k": head.k_proj.weight.T, "W_v": head.v_proj.weight.T,
            "W_o": head.o_proj.weight.T, "w": head.score.weight[0], "b": head.score.bias[0]}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_forward_matches_the_paper_loop_and_eager_gradients(backend):
    head = make_head(backend)
    rte, hidden = torch.randn(5, 24, device=DEVICE), torch.randn(5, 7, 20, device=DEVICE)
    mask = torch.rand(5, 7, device=DEVICE) > 0.3
    mask[:, 0] = True
    rewards = head(rte, hidden, mask=mask, step=6)
    omega = head.resolve_omega(step=6)
    want = r2m_head_loop({k: v.detach().cpu() for k, v in head_params(head).items()},
                         rte.cpu(), hidden.cpu(), 2, omega, mask=mask.cpu())
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards.cpu().double(), want, rtol=1e-5, atol=1e-6)
    # H_fin is still offered, and scoring it gives the same rewards.
    h_fin = head.embed(rte, hidden, mask=mask, step=6)
    torch.testing.assert_close(head.score(h_fin).squeeze(-1), rewards, rtol=1e-5, atol=1e-6)
    # Every parameter's gradient equals the eager (paper-as-written) head's.
    grad_out = torch.randn(5, device=DEVICE)
    got = torch.autograd.grad(rewards, list(head.parameters()), grad_out)
    head.backend = "eager"
    want = torch.autograd.grad(head(rte, hidden, mask=mask, step=6), list(head.parameters()), grad_out)
    for (name, _), g, w in zip(head.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["eager", "torch", "triton", "auto"])
@pytest.mark.parametrize("rte_dtype", [torch.float32, torch.float16])
def test_step_zero_is_bitwise_the_reward_models_score(backend, rte_dtype):
    head = make_head(backend)
    rte = torch.randn(6, 24, device=DEVICE).to(rte_dtype)
    hidden = torch.randn(6, 5, 20, device=DEVICE)
    rewards = head(rte, hidden, step=0)
    assert torch.equal(rewards, head.score(rte.float()).squeeze(-1))
    assert torch.equal(head(rte, hidden, omega=1.0), rewards)
    # The attention block is in the graph with a zero gradient, as in the eager formula.
    grads = torch.autograd.grad(rewards.sum(), [head.q_proj.weight, head.o_proj.weight])
    assert all(g is not None and (g == 0).all() for g in grads)


@pytest.mark.gpu
def test_gpu_paper_width_against_float64():
    check_triton(random_inputs(64, 2048, 4096), 0.6, rtol=1e-5)
    check_triton(random_inputs(64, 2048, 4096, rte_dtype=torch.bfloat16), 0.6, rtol=1e-5)


def test_every_output_element_is_written(monkeypatch):
    # Buffers come from torch.empty: poison them so an element the kernels skip shows as NaN.
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    check_triton(random_inputs(35, 33, 65), 0.6)
    check_triton(random_inputs(35, 33, 65), 0.6, requires=("rte", "score_weight"))
