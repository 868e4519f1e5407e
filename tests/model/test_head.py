"""R2MHead: eager against the float64 loop, folded backends against eager, the schedule, and
a whole R2M update under torch.compile."""

import pytest
import torch
import torch.nn as nn

import r2m_kernels
from r2m import R2MHead, omega
from tests.support.backends import DEVICE
from tests.support.inputs import MASK_KINDS, make_mask, pack
from tests.support.loops import attention_weights_loop, r2m_head_loop
from tests.support.pool_checks import make_inputs

FOLDED = [b for b in ("torch", "triton", "cuda") if b in r2m_kernels.available_backends("attention_pool", "cpu")]


def make_head(rm_dim=11, policy_dim=13, attn_dim=12, heads=1, dtype=torch.float64, **kwargs):
    head = R2MHead(rm_dim, policy_dim, attn_dim, heads, **kwargs).to(dtype)
    with torch.no_grad():  # larger weights than the default init: non-trivial attention
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head


def loop_params(head):
    return {"W_q": head.q_proj.weight.T, "W_k": head.k_proj.weight.T, "W_v": head.v_proj.weight.T,
            "W_o": head.o_proj.weight.T, "w": head.score.weight[0], "b": head.score.bias[0]}


def all_grads(head, rewards, extra, seed=0):
    g = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(seed), dtype=rewards.dtype)
    inputs = list(head.parameters()) + list(extra)
    return torch.autograd.grad((rewards * g).sum(), inputs, retain_graph=True)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("heads, seq_len", [(1, 1), (1, 9), (3, 7)])
def test_eager_matches_the_float64_loop(mask_kind, heads, seq_len):
    head = make_head(heads=heads, backend="eager")
    rte = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(3, seq_len, 13, dtype=torch.float64, requires_grad=True)
    mask = make_mask(3, seq_len, mask_kind)
    w = 0.35
    got = head(rte, hidden, mask=mask, omega=w)
    want = r2m_head_loop(loop_params(head), rte, hidden, heads, w, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(all_grads(head, got, (rte, hidden)), all_grads(head, want, (rte, hidden))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# The head's folding is the same code for every backend: fp64 checks it to rounding (on torch);
# fp32 checks each backend's pool inside the head (triton's fp64 kernels are checked in
# test_attention_pool.py).
FOLDED_DTYPES = [(b, torch.float64, 1e-10) for b in FOLDED if b == "torch"] + [(b, torch.float32, 2e-5) for b in FOLDED]


@pytest.mark.parametrize("backend, dtype, tol", FOLDED_DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])  # mixed: right, left padding and holes
@pytest.mark.parametrize("heads, seq_len, policy_dim", [(1, 1, 13), (1, 37, 19), (4, 10, 13)])
def test_folded_matches_eager(backend, dtype, tol, mask_kind, heads, seq_len, policy_dim):
    torch.manual_seed(seq_len * 7 + heads)
    eager = make_head(policy_dim=policy_dim, heads=heads, dtype=dtype, backend="eager")
    folded = make_head(policy_dim=policy_dim, heads=heads, dtype=dtype, backend=backend)
    folded.load_state_dict(eager.state_dict())
    rte = torch.randn(5, 11, dtype=dtype, requires_grad=True)
    hidden = torch.randn(5, seq_len, policy_dim, dtype=dtype, requires_grad=True)
    mask = make_mask(5, seq_len, mask_kind)
    want = eager(rte, hidden, mask=mask, omega=0.4)
    got = folded(rte, hidden, mask=mask, omega=0.4)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    names = [n for n, _ in eager.named_parameters()] + ["rte", "hidden"]
    for name, a, b in zip(names, all_grads(folded, got, (rte, hidden)), all_grads(eager, want, (rte, hidden))):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["eager"] + FOLDED)
def test_packed_equals_padded(backend):
    head = make_head(heads=2, backend=backend)
    rte = torch.randn(4, 11, dtype=torch.float64)
    hidden = torch.randn(4, 15, 13, dtype=torch.float64)
    mask = make_mask(4, 15, "holes")
    packed, cu = pack(hidden, mask)
    torch.testing.assert_close(head(rte, packed, cu_seqlens=cu, omega=0.2),
                               head(rte, hidden, mask=mask, omega=0.2), rtol=1e-12, atol=1e-12)


# At omega = 1 the pool's values never reach the reward: one dtype is enough for triton's.
STEP_ZERO = [(b, d) for b in ["eager", "auto"] + FOLDED
             for d in ([torch.float32] if b == "triton" else [torch.float32, torch.float16, torch.bfloat16])]


@pytest.mark.parametrize("backend, dtype", STEP_ZERO)
def test_step_zero_is_the_original_reward_exactly(backend, dtype):
    """docs/design.md §1.2: at omega = 1 the reward is bitwise the RM's score(rte)."""
    head = R2MHead(11, 13, 12, 2, total_steps=50, backend=backend)
    rte = torch.randn(6, 11).to(dtype)
    hidden = torch.randn(6, 8, 13).to(dtype)
    rewards = head(rte, hidden, step=0)
    assert rewards.dtype == torch.float32 and rewards.shape == (6,)
    assert torch.equal(rewards, head.score(rte.float()).squeeze(-1))
    assert torch.equal(head(rte, hidden, omega=1.0), rewards)
    # The attention block is in the graph with a zero gradient, as in the eager formula.
    grads = torch.autograd.grad(rewards.sum(), [head.q_proj.weight, head.o_proj.weight])
    assert all(g is not None and (g == 0).all() for g in grads)
    assert not torch.equal(head(rte, hidden, step=25), rewards)  # the attention matters later


def test_step_omega_and_evaluation_weights():
    head = make_head(omega_floor=0.7, total_steps=20)
    rte, hidden = torch.randn(2, 11, dtype=torch.float64), torch.randn(2, 5, 13, dtype=torch.float64)
    for step in (0, 3, 10, 20):
        torch.testing.assert_close(head(rte, hidden, step=step), head(rte, hidden, omega=omega(step, 20, 0.7)))
    torch.testing.assert_close(head(rte, hidden), head(rte, hidden, omega=0.7))  # evaluation: t = T
    h_hat = head.attend(rte, hidden)
    torch.testing.assert_close(head.embed(rte, hidden, omega=0.25), 0.75 * h_hat + 0.25 * rte)
    torch.testing.assert_close(head(rte, hidden, omega=0.25), head.score(0.75 * h_hat + 0.25 * rte).squeeze(-1))
    with pytest.raises(ValueError, match="step or omega"):
        head(rte, hidden, step=1, omega=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        make_head()(rte, hidden, step=1)
    with pytest.raises(ValueError, match="omega"):
        head(rte, hidden, omega=1.5)


@pytest.mark.parametrize("backend", ["eager", *FOLDED])
def test_reward_terms_add_up_to_the_reward(backend):
    """head term + RM term + b is the reward; at omega = 1 the head term is zero."""
    head = make_head(omega_floor=0.4, total_steps=10, backend=backend, dtype=torch.float32)
    rte, hidden = torch.randn(3, 11), torch.randn(3, 6, 13)
    mask = make_mask(3, 6, "mixed")
    for kwargs in (dict(omega=0.3), dict(step=4), {}):
        head_term, rm_term = head.reward_terms(rte, hidden, mask=mask, **kwargs)
        assert head_term.dtype == rm_term.dtype == torch.float32 and head_term.shape == (3,)
        torch.testing.assert_close(head_term + rm_term + head.score.bias, head(rte, hidden, mask=mask, **kwargs))
    head_term, rm_term = head.reward_terms(rte, hidden, mask=mask, omega=1.0)
    assert not head_term.any()
    torch.testing.assert_close(rm_term + head.score.bias, head.score(rte).squeeze(-1))


def test_16bit_inputs_fp32_parameters_and_rewards():
    head = R2MHead(11, 13, 12, 3)
    rte, hidden = torch.randn(4, 11).half(), torch.randn(4, 6, 13).bfloat16()
    rewards = head(rte, hidden, omega=0.5)
    assert rewards.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in head.parameters())
    rewards.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("backend", FOLDED)
def test_bf16_error_is_within_twice_eager_error(backend):
    """docs/design.md §5: in low precision, the folded path's error against float64 is at most twice the
    error of the eager path run in the same precision, plus a small slack."""
    ref = make_head(rm_dim=24, policy_dim=40, attn_dim=32, heads=2)
    rte = torch.randn(8, 24, dtype=torch.float64)
    hidden = torch.randn(8, 33, 40, dtype=torch.float64)
    mask = make_mask(8, 33, "left")
    want = ref(rte, hidden, mask=mask, omega=0.3)
    errors = {}
    for name in ("eager", backend):
        head = make_head(rm_dim=24, policy_dim=40, attn_dim=32, heads=2, dtype=torch.bfloat16, backend=name)
        head.load_state_dict(ref.state_dict())
        got = head(rte.bfloat16(), hidden.bfloat16(), mask=mask, omega=0.3)
        errors[name] = (got.double() - want).abs().max().item()
    assert errors[backend] <= 2 * errors["eager"] + 1e-2, errors


def test_from_score_head_copies_phi():
    rm_head = nn.Linear(11, 1).to(torch.bfloat16)
    head = R2MHead.from_score_head(rm_head, policy_dim=13, attn_dim=8, num_heads=2, omega_floor=0.5)
    assert (head.rm_dim, head.policy_dim, head.attn_dim, head.num_heads, head.omega_floor) == (11, 13, 8, 2, 0.5)
    assert head.score.weight.dtype == torch.float32
    assert torch.equal(head.score.weight, rm_head.weight.float())
    assert torch.equal(head.score.bias, rm_head.bias.float())
    rte = torch.randn(3, 11)
    torch.testing.assert_close(head(rte, torch.randn(3, 4, 13), omega=1.0),
                               (rte @ rm_head.weight.float().T + rm_head.bias.float()).squeeze(-1))
    no_bias = R2MHead.from_score_head(nn.Linear(11, 1, bias=False), policy_dim=13, attn_dim=8)
    assert torch.equal(no_bias.score.bias, torch.zeros(1))
    with pytest.raises(ValueError, match="out_features"):
        R2MHead.from_score_head(nn.Linear(11, 2), policy_dim=13)
    with pytest.raises(TypeError, match="linear"):
        R2MHead.from_score_head(torch.randn(1, 11), policy_dim=13)


def test_only_the_head_parameters_exist_and_train():
    head = R2MHead(16, 24, 8, 2, backend="torch")
    names = sorted(n for n, _ in head.named_parameters())
    assert names == ["k_proj.weight", "o_proj.weight", "q_proj.weight", "score.bias", "score.weight", "v_proj.weight"]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    rte, hidden = torch.randn(8, 16), torch.randn(8, 5, 24)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    loss = r2m_kernels.grebt_loss(head(rte, hidden, omega=0.5), 4)
    loss.backward()
    opt.step()
    # GREBT only sees differences and standardised rewards: the shared bias gets no gradient.
    assert head.score.bias.grad.abs().item() < 1e-6
    assert all(not torch.equal(before[n], p) for n, p in head.named_parameters() if n != "score.bias")


@pytest.mark.parametrize("backend", ["eager"] + FOLDED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
# The packed case puts inf in a valid row on purpose: the interpreter's numpy says inf - inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_values_at_invalid_positions_do_not_leak(backend, bad):
    """Pad positions of real hidden states may hold NaN/Inf (fully masked attention rows):
    masked or beyond-the-end rows must not reach any reward or gradient, padded or packed."""
    head = make_head(heads=2, backend=backend)
    rte = torch.randn(3, 11, dtype=torch.float64)
    hidden = torch.randn(3, 9, 13, dtype=torch.float64)
    mask = make_mask(3, 9, "holes")
    mask[0, 0] = False
    clean = head(rte, hidden, mask=mask, omega=0.3)
    dirty = hidden.clone()
    dirty[~mask] = bad
    dirty.requires_grad_(True)
    got = head(rte, dirty, mask=mask, omega=0.3)
    torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(got.sum(), dirty)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    # Packed: the last row of sequence 0 is non-finite and sequence 0 is its only owner.
    packed, cu = pack(hidden, mask)
    end0 = int(cu[1]) - 1
    packed_bad = packed.clone()
    packed_bad[end0] = bad
    out = head(rte, packed_bad, cu_seqlens=cu, omega=0.3)
    assert not torch.isfinite(out[0]) and torch.isfinite(out[1:]).all()  # no leak into the others
    torch.testing.assert_close(out[1:], clean[1:], rtol=1e-12, atol=1e-12)


def head_pair(backend, num_heads=2):
    """An fp32 R2MHead with `backend` and a torch-backend copy with the same weights."""
    fast = R2MHead(40, 24, attn_dim=16, num_heads=num_heads, omega_floor=0.3, backend=backend)
    ref = R2MHead(40, 24, attn_dim=16, num_heads=num_heads, omega_floor=0.3, backend="torch")
    ref.load_state_dict(fast.state_dict())
    return fast.to(DEVICE), ref.to(DEVICE)


def test_torch_compile_fullgraph(compiled_backend):
    """torch.compile(fullgraph=True) traces a whole R2M update with a compiled backend (the
    head's folded attention, score_mix and the GREBT loss, all torch.library custom ops)
    without a graph break, and gradients flow through every op. aot_eager runs the ops
    themselves (on the CPU: the interpreter, the cuda contract model); the gpu test below
    compiles the head with inductor."""
    fast, ref = head_pair(compiled_backend)

    def update_loss(head, rte, hidden, cu_seqlens):
        rewards = head(rte, hidden, cu_seqlens=cu_seqlens, omega=0.4)
        return r2m_kernels.grebt_loss(rewards, 2, backend=head.backend)

    compiled = torch.compile(update_loss, fullgraph=True, backend="aot_eager")
    rte = torch.randn(4, 40, device=DEVICE)
    hidden, _, _, cu_seqlens = make_inputs("packed", 4, 11, 24, 1)
    hidden = hidden.float()
    loss = compiled(fast, rte, hidden, cu_seqlens)
    loss.backward()
    loss_ref = update_loss(ref, rte, hidden, cu_seqlens)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        if name == "score.bias":  # GREBT ignores a shift of every reward: both are rounding noise
            assert p.grad.abs().item() < 1e-5 and p_ref.grad.abs().item() < 1e-5
            continue
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_head_matches_torch(backend):
    fast, ref = head_pair(backend)
    hidden, _, mask, _ = make_inputs("holes", 3, 50, 24, 1)
    rte = torch.randn(3, 40, device=DEVICE)
    for head in (fast, ref):
        head(rte, hidden.float(), mask=mask, omega=0.4).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    fast, ref = head_pair("triton", num_heads=4)
    compiled = torch.compile(fast, fullgraph=True)
    rte = torch.randn(8, 40, device="cuda")
    hidden, _, mask, _ = make_inputs("left", 8, 300, 24, 1, device="cuda")
    hidden = hidden.to(torch.bfloat16)
    rewards = compiled(rte, hidden, mask=mask)
    rewards_ref = ref(rte, hidden, mask=mask)
    torch.testing.assert_close(rewards, rewards_ref, rtol=2e-2, atol=2e-2)
    rewards.sum().backward()
    rewards_ref.sum().backward()
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("heads, seq_len", [(1, 1), (1, 9), (3, 7)])
def test_attention_weights_match_the_float64_loop(backend, mask_kind, heads, seq_len):
    """R2MHead.attention_weights against the paper's weights computed position by position
    with K materialised: equal at the valid positions, 0 at the others, summing to 1 over each
    row's valid positions; non-contiguous inputs; packed input gives each row's valid
    positions from its start."""
    gen = torch.Generator().manual_seed(seq_len * 10 + heads)
    head = make_head(heads=heads, backend=backend)
    rte = torch.randn(11, 5, dtype=torch.float64, generator=gen).T  # (5, 11), non-contiguous
    hidden = torch.randn(5, 13, seq_len, dtype=torch.float64, generator=gen).transpose(1, 2)
    mask = make_mask(5, seq_len, mask_kind, generator=gen)
    got = head.attention_weights(rte, hidden, mask=mask)
    want = attention_weights_loop(loop_params(head), rte, hidden, heads, mask)
    assert got.shape == (5, heads, seq_len) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    valid = torch.ones(5, seq_len, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got.sum(-1), torch.ones(5, heads, dtype=torch.float64))
    assert (got.masked_fill(valid[:, None, :], 0) == 0).all()
    if mask is not None:
        packed, cu = pack(hidden, mask)
        from_packed = head.attention_weights(rte, packed, cu_seqlens=cu)
        for b in range(5):
            n = int(valid[b].sum())
            torch.testing.assert_close(from_packed[b, :, :n], got[b][:, valid[b]], rtol=1e-12, atol=1e-14)
            assert (from_packed[b, :, n:] == 0).all()


def test_attention_weights_of_a_16_bit_input_and_bad_input():
    """fp32 parameters and bf16 hidden: fp32 weights near the float64 ones of the same rounded
    input; a padded position holding NaN gets weight 0; an all-masked row is an error."""
    head = make_head(dtype=torch.float32)
    rte = torch.randn(3, 11)
    hidden = torch.randn(3, 6, 13).to(torch.bfloat16)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    hidden[0, 0] = float("nan")
    got = head.attention_weights(rte, hidden, mask=mask)
    want = attention_weights_loop(loop_params(head), rte, hidden.double().nan_to_num(), 1, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        head.attention_weights(rte, hidden, mask=mask * torch.tensor([[1], [1], [0]]))
