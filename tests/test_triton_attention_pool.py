"""The triton backend of attention_pool against the float64 reference (DESIGN §5).

On the CPU the kernels run in Triton's interpreter (fp32 and fp16, small odd shapes); the
`gpu` tests repeat the checks in bf16/fp16/fp32 at realistic sizes. Every buffer the kernels
write is poisoned with NaN first, so a position they fail to write shows up as NaN.

The rule: the triton result's max error against float64 is at most twice the error of the
torch backend run in the same dtype, plus a small slack relative to the result's size.
"""

from __future__ import annotations

import math

import pytest
import torch

import r2m_kernels
from r2m import R2MHead
from r2m_kernels import dispatch
from r2m_kernels.reference import attention_pool_torch
from r2m_kernels.triton import attention_pool as triton_pool

SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_pool, "_empty", nan_empty)


@pytest.fixture
def splits_used(monkeypatch):
    """The number of flash-decoding splits of every kernel launch, in order."""
    used, choose = [], triton_pool._num_splits

    def recording(*args):
        used.append(choose(*args))
        return used[-1]

    monkeypatch.setattr(triton_pool, "_num_splits", recording)
    return used


def make_inputs(kind, batch, seq_len, d_p, heads, device="cpu"):
    """float64 hidden, q and the layout: mask for padded kinds, cu_seqlens for "packed".

    kinds: "dense" (no mask), "holes" (random holes, every row keeps a position), "left"
    (left padding of different lengths, one longer than half the row, as an int64 mask),
    "packed" (ragged lengths including 1 and seq_len)."""
    mask = cu_seqlens = None
    if kind == "packed":
        lengths = torch.randint(1, seq_len + 1, (batch,))
        lengths[0], lengths[-1] = 1, seq_len
        cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
        cu_seqlens[1:] = lengths.cumsum(0)
        hidden = torch.randn(int(cu_seqlens[-1]), d_p, dtype=torch.float64)
        cu_seqlens = cu_seqlens.to(device)
    else:
        hidden = torch.randn(batch, seq_len, d_p, dtype=torch.float64)
        if kind == "holes":
            mask = torch.rand(batch, seq_len) > 0.35
            mask[torch.arange(batch), torch.randint(0, seq_len, (batch,))] = True
        elif kind == "left":
            pad = torch.randint(0, seq_len, (batch,))
            pad[0] = (2 * seq_len) // 3
            mask = (torch.arange(seq_len)[None, :] >= pad[:, None]).long()
        if mask is not None:
            mask = mask.to(device)
    q = torch.randn(batch, heads, d_p, dtype=torch.float64)
    return hidden.to(device), q.to(device), mask, cu_seqlens


def pool_and_grads(backend, hidden, q, scale, mask, cu_seqlens, grad, hidden_grad):
    """(pooled, dq, dhidden or None) of attention_pool with `backend` on leaf copies."""
    hidden = hidden.detach().clone().requires_grad_(hidden_grad)
    q = q.detach().clone().requires_grad_(True)
    pooled = r2m_kernels.attention_pool(hidden, q, scale, mask=mask, cu_seqlens=cu_seqlens,
                                        backend=backend)
    pooled.backward(grad.to(pooled.dtype))
    return pooled.detach(), q.grad, hidden.grad


def assert_within_rule(name, got, ref64, same_dtype_torch, slack):
    assert got is not None and torch.isfinite(got).all(), f"{name}: missing or non-finite values"
    err = (got.double() - ref64).abs().max().item()
    err_torch = (same_dtype_torch.double() - ref64).abs().max().item()
    bound = 2 * err_torch + slack * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x torch's {err_torch:.3g} + slack ({bound:.3g})"


def check_against_reference(kind, batch, seq_len, d_p, heads, dtype, q_dtype, hidden_grad,
                            device="cpu"):
    hidden64, q64, mask, cu_seqlens = make_inputs(kind, batch, seq_len, d_p, heads, device)
    scale = 2.0 / math.sqrt(d_p)
    grad = torch.randn(batch, heads, d_p, dtype=torch.float64, device=device)
    ref = pool_and_grads("torch", hidden64, q64, scale, mask, cu_seqlens, grad, True)
    low = (hidden64.to(dtype), q64.to(q_dtype))
    eager = pool_and_grads("torch", *low, scale, mask, cu_seqlens, grad, hidden_grad)
    fast = pool_and_grads("triton", *low, scale, mask, cu_seqlens, grad, hidden_grad)

    assert fast[0].dtype == dtype and fast[0].shape == (batch, heads, d_p)
    assert fast[1].dtype == q_dtype
    slack = SLACK[dtype]
    assert_within_rule("pooled", fast[0], ref[0], eager[0], slack)
    assert_within_rule("dq", fast[1], ref[1], eager[1], slack)
    if hidden_grad:
        assert fast[2].dtype == dtype and fast[2].shape == hidden64.shape
        assert_within_rule("dhidden", fast[2], ref[2], eager[2], slack)
    else:
        assert fast[2] is None


# (kind, B, S, D_p, n_h, split). The interpreter pretends to have 2 SMs: fewer than 4
# programs with S > 64 take the flash-decoding split path; `split` says whether a case does.
CPU_CASES = [
    ("dense", 3, 37, 24, 1, False),    # D_p not a power of two
    ("dense", 1, 150, 33, 1, True),
    ("dense", 2, 1, 17, 1, False),     # S = 1
    ("holes", 3, 45, 20, 3, False),    # several heads summed into dhidden
    ("holes", 1, 131, 16, 2, True),
    ("left", 2, 150, 19, 1, True),     # left padding; row 0's first split has no valid position
    ("packed", 4, 40, 21, 1, False),
    ("packed", 2, 140, 18, 2, True),   # lengths 1 and 140
]


@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads,split", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64_reference(kind, batch, seq_len, d_p, heads, split, dtype, splits_used):
    check_against_reference(kind, batch, seq_len, d_p, heads, dtype, dtype, hidden_grad=True)
    assert len(splits_used) == 2 and any(n > 1 for n in splits_used) == split


@pytest.mark.parametrize("kind,batch,seq_len,heads", [("holes", 3, 29, 2), ("packed", 1, 140, 3)])
def test_fp16_hidden_fp32_q_without_hidden_grad(kind, batch, seq_len, heads):
    """R2M's case: a 16-bit frozen hidden (no dhidden: one program per head in the backward
    too) and an fp32 folded query."""
    check_against_reference(kind, batch, seq_len, 26, heads, torch.float16, torch.float32,
                            hidden_grad=False)


def test_non_contiguous_inputs():
    hidden64 = torch.randn(23, 3, 30, dtype=torch.float64).transpose(0, 1)  # (3, 23, 30), strided
    q64 = torch.randn(3, 30, 2, dtype=torch.float64).transpose(1, 2)        # (3, 2, 30), strided
    grad = torch.randn(3, 2, 30, dtype=torch.float64).expand(3, 2, 30)
    ref = pool_and_grads("torch", hidden64, q64, 0.2, None, None, grad, True)
    fast = pool_and_grads("triton", hidden64.float(), q64.float(), 0.2, None, None, grad, True)
    for name, got, want in zip(("pooled", "dq", "dhidden"), fast, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind,heads", [("holes", 2), ("packed", 1)])
def test_float64_matches_reference_tightly(kind, heads):
    """fp64 hidden accumulates in fp64, so the kernels match the reference to rounding."""
    hidden, q, mask, cu_seqlens = make_inputs(kind, 3, 40, 23, heads)
    grad = torch.randn(3, heads, 23, dtype=torch.float64)
    ref = pool_and_grads("torch", hidden, q, 0.4, mask, cu_seqlens, grad, True)
    fast = pool_and_grads("triton", hidden, q, 0.4, mask, cu_seqlens, grad, True)
    for name, got, want in zip(("pooled", "dq", "dhidden"), fast, ref):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12, msg=name)


def test_rejects_what_it_cannot_run():
    wide = torch.randn(1, 1, triton_pool.MAX_D_P + 1)
    with pytest.raises(ValueError, match="D_p"):
        r2m_kernels.attention_pool(wide, torch.randn(1, 1, wide.shape[-1]), 1.0, backend="triton")


def test_registered_with_dispatch():
    name, fn = dispatch.resolve("attention_pool", "triton", torch.device("cpu"))
    assert name == "triton" and fn is triton_pool.attention_pool_triton
    # On CUDA tensors "auto" prefers the compiled extension, then triton.
    cuda = torch.device("cuda")
    assert "triton" in dispatch.available_backends("attention_pool", cuda)
    expected = "cuda" if "cuda" in dispatch.available_backends("attention_pool", cuda) else "triton"
    assert dispatch.resolve("attention_pool", "auto", cuda)[0] == expected


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the op agree with the
    real implementation (torch.library.opcheck). The packed layout's fake implementation is
    exercised by test_torch_compile_fullgraph."""
    hidden, q, mask, _ = make_inputs("holes", 2, 9, 12, 2)
    hidden, q = hidden.float().requires_grad_(), q.float().requires_grad_()
    torch.library.opcheck(triton_pool._pool_forward, (hidden, q, 0.5, mask, None))


def head_pair(num_heads, dtype=torch.float64):
    """An R2MHead with the triton backend and a float64 eager copy with the same weights."""
    fast = R2MHead(40, 24, attn_dim=16, num_heads=num_heads, omega_floor=0.3, backend="triton")
    ref = R2MHead(40, 24, attn_dim=16, num_heads=num_heads, omega_floor=0.3, backend="eager")
    ref.load_state_dict(fast.state_dict())
    return fast, ref.to(dtype)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_r2m_head_triton_matches_eager_float64(num_heads):
    fast, ref = head_pair(num_heads)
    rte = torch.randn(3, 40)
    hidden, _, mask, _ = make_inputs("left", 3, 21, 24, 1)
    hidden = hidden.float()
    rewards = fast(rte, hidden, mask=mask)
    rewards_ref = ref(rte.double(), hidden.double(), mask=mask)
    torch.testing.assert_close(rewards.double(), rewards_ref, rtol=1e-5, atol=1e-5)
    rewards.sum().backward()
    rewards_ref.sum().backward()
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces a whole R2M update with the triton backend (the
    head's folded attention, score_mix and the GREBT loss, all torch.library custom ops)
    without a graph break, and gradients flow through every op. On the CPU the aot_eager
    backend (the ops themselves run in the interpreter); the gpu test below compiles the
    head with inductor."""
    fast, ref = head_pair(2, torch.float32)
    ref.backend = "torch"

    def update_loss(head, rte, hidden, cu_seqlens):
        rewards = head(rte, hidden, cu_seqlens=cu_seqlens, omega=0.4)
        return r2m_kernels.grebt_loss(rewards, 2, backend=head.backend if head.backend != "eager" else "torch")

    compiled = torch.compile(update_loss, fullgraph=True, backend="aot_eager")
    rte = torch.randn(4, 40)
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


# ---------------------------------------------------------------- GPU (owed: no GPU here)

GPU_CASES = [
    ("dense", 16, 1000, 4096, 1),
    ("left", 8, 1024, 2048, 1),
    ("holes", 4, 777, 1000, 4),
    ("packed", 6, 1500, 4096, 1),
    ("holes", 4, 512, 1536, 16),
    ("dense", 1, 32768, 2048, 1),    # long sequence, split path
    ("packed", 2, 16384, 896, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("hidden_grad", [False, True], ids=["dq", "dq+dhidden"])
def test_gpu_matches_float64_reference(kind, batch, seq_len, d_p, heads, dtype, hidden_grad):
    check_against_reference(kind, batch, seq_len, d_p, heads, dtype, torch.float32, hidden_grad,
                            device="cuda")


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    fast, ref = head_pair(4, torch.float32)
    fast, ref = fast.cuda(), ref.cuda()
    ref.backend = "torch"
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
