"""attention_pool (docs/design.md §2): the torch backend (the reference) against the float64
loop of tests/support/loops.py, then every backend (torch, triton, cuda: tests/support/backends.py) against
the float64 reference under the error rule of §5, on the layouts, sizes, variants and splits
the kernels distinguish. The gpu tests repeat the comparison at realistic sizes.

The triton backend has two variants, the per-head kernels (attention_pool.py) and the
many-head tensor-core kernels (attention_pool_many_heads.py); tests pick one by moving the
threshold MANY_HEADS_MIN. Every buffer the triton kernels write is poisoned with NaN first,
so a position they fail to write shows up as NaN.
"""

from __future__ import annotations


import pytest
import torch

from r2m_kernels import attention_pool, splits
from r2m_kernels import reference
from r2m_kernels.cuda import attention_pool as cuda_pool
from r2m_kernels.triton import attention_pool as triton_pool
from r2m_kernels.triton import attention_pool_many_heads as many_heads
from r2m_kernels.triton import pool_layout

from tests.support.backends import DEVICE, check_second_derivative, params, use
from tests.support.inputs import MASK_KINDS, make_mask, pack
from tests.support.loops import attention_pool_loop
from tests.support.pool_checks import (GPU_DTYPES, HIDDEN_GRADS, SLACK, assert_within_rule,
                          check_against_reference, make_inputs, pool_and_grads,
                          run_with_references)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(pool_layout, "empty", nan_empty)


@pytest.fixture
def splits_used(monkeypatch):
    """The number of flash-decoding splits of every launch, in order, on a pretend 2-SM
    device (as off the GPU): fewer than 4 programs with S > 64 split."""
    used, choose = [], splits.num_splits
    monkeypatch.setattr(splits, "multiprocessor_count", lambda device: 2)

    def recording(*args):
        used.append(choose(*args))
        return used[-1]

    monkeypatch.setattr(splits, "num_splits", recording)
    return used


@pytest.fixture
def many_heads_calls(monkeypatch):
    """The many-head variant's host calls ("forward", "backward"), in order."""
    calls = []
    for name in ("forward", "backward"):
        def recording(*args, _name=name, _fn=getattr(many_heads, f"pool_{name}")):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(many_heads, f"pool_{name}", recording)
    return calls


def use_variant(request, variant):
    """Make triton's attention_pool take `variant` ("many-heads" or "per-head") at every n_h
    until the test ends."""
    scope = many_heads.forced_variant(variant)
    scope.__enter__()
    request.addfinalizer(lambda: scope.__exit__(None, None, None))


# The implementations: the backends, with triton's two variants apart.
IMPLEMENTATIONS = [*params(["torch"]), *(pytest.param(("triton", v), marks=p.marks, id=f"triton-{v}")
                                         for p in params(["triton"]) for v in ("per-head", "many-heads")),
                   *params(["cuda"])]


def _prepare(request, monkeypatch):
    name, variant = request.param if isinstance(request.param, tuple) else (request.param, None)
    if variant:
        use_variant(request, variant)
    return use(name, monkeypatch)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request, monkeypatch):
    """Each backend in turn, triton once per variant; the backend's name."""
    return _prepare(request, monkeypatch)


@pytest.fixture(params=IMPLEMENTATIONS[1:])
def compiled_implementation(request, monkeypatch):
    """triton (each variant) and cuda in turn."""
    return _prepare(request, monkeypatch)


# ------------------------------------------------------- the reference against the loop

@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("batch, seq_len, dim, heads", [(3, 1, 5, 1), (2, 37, 19, 3), (4, 9, 33, 2)])
def test_reference_matches_the_float64_loop(mask_kind, batch, seq_len, dim, heads):
    hidden = torch.randn(batch, seq_len, dim, dtype=torch.float64, requires_grad=True)
    q = torch.randn(batch, heads, dim, dtype=torch.float64, requires_grad=True)
    mask = make_mask(batch, seq_len, mask_kind)
    got = attention_pool(hidden, q, 0.37, mask=mask, backend="torch")
    want = attention_pool_loop(hidden, q, 0.37, mask)
    assert got.shape == (batch, heads, dim) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn(got.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (hidden, q), grad)
    for g, w in zip(got_grads, torch.autograd.grad(want, (hidden, q), grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if mask is not None:  # padding contributes nothing and receives no gradient
        assert (got_grads[0][~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_hidden_with_fp32_query(dtype):
    hidden = torch.randn(3, 21, 24).to(dtype)
    q = torch.randn(3, 2, 24) * 0.3
    mask = make_mask(3, 21, "holes")
    out = attention_pool(hidden, q, 0.5, mask=mask, backend="torch")
    assert out.dtype == dtype and out.shape == (3, 2, 24)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # one rounding
    torch.testing.assert_close(out.double(), attention_pool_loop(hidden, q, 0.5, mask), rtol=tol, atol=tol)


def test_reference_16bit_path_keeps_one_chunk_in_fp32(monkeypatch):
    """docs/design.md §2: for 16-bit hidden the torch backend's fp32 copy of hidden is made a
    chunk of sequences at a time and recomputed in the backward: autograd keeps no fp32
    tensor of hidden's size, and chunked results equal unchunked ones."""
    hidden = torch.randn(6, 10, 16).half().requires_grad_(True)
    q = torch.randn(6, 2, 16, requires_grad=True)
    mask = make_mask(6, 10, "left")
    whole = attention_pool(hidden, q, 0.3, mask=mask, backend="torch")
    whole_grads = torch.autograd.grad(whole.float().pow(2).sum(), (hidden, q))
    monkeypatch.setattr(reference, "FP32_CHUNK_ELEMENTS", 2 * 10 * 16)  # 2 sequences a chunk
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked = attention_pool(hidden, q, 0.3, mask=mask, backend="torch")
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= 2 * 10 * 16]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    for g, w in zip(torch.autograd.grad(chunked.float().pow(2).sum(), (hidden, q)), whole_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- every backend against float64

# (kind, B, S, D_p, n_h, triton variant, split). The per-head cases first; the many-head
# variant's head block is max(16, next pow2 of n_h) and the interpreter's blocks are 16
# positions by 32 columns, so D_p > 32 crosses D-chunks. `split`: whether triton's passes
# split a sequence (2 pretend SMs: fewer than 4 programs with S > 64). Padded kinds carry
# NaN in their masked-out rows.
CASES = [
    ("dense", 3, 37, 24, 1, "per-head", False),     # D_p not a power of two
    ("dense", 1, 150, 33, 1, "per-head", True),
    ("dense", 2, 1, 17, 1, "per-head", False),      # S = 1
    ("holes", 3, 45, 20, 3, "per-head", False),     # several heads summed into dhidden
    ("holes", 1, 131, 16, 2, "per-head", True),
    ("left", 2, 150, 19, 1, "per-head", True),      # left padding; row 0's first split is empty
    ("packed", 4, 40, 21, 1, "per-head", False),
    ("packed", 2, 140, 18, 2, "per-head", True),    # lengths 1 and 140
    ("dense", 2, 37, 40, 16, "many-heads", False),  # D_p not a power of two, two D-chunks
    ("holes", 3, 37, 72, 3, "many-heads", False),   # 3 heads padded to 16, three D-chunks
    ("left", 2, 150, 24, 5, "many-heads", True),    # left padding; a split with no valid position
    ("packed", 3, 40, 40, 32, "many-heads", False),  # 32 heads (head block 32); lengths 1 and 40
    ("dense", 2, 1, 17, 16, "many-heads", False),   # S = 1
    ("packed", 1, 140, 20, 8, "many-heads", True),
    ("holes", 2, 29, 33, 1, "many-heads", False),   # one head through the dots
]


@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads,variant,split", CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}-h{c[4]}-{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64_reference(kind, batch, seq_len, d_p, heads, variant, split, dtype, backend,
                                   splits_used, many_heads_calls, request):
    use_variant(request, variant)
    check_against_reference(backend, kind, batch, seq_len, d_p, heads, dtype, dtype, hidden_grad=True,
                            nan_pads=True)
    if backend == "triton":
        assert many_heads_calls == (["forward", "backward"] if variant == "many-heads" else [])
        # Per-head: one launch each way. Many-head: score and pooling passes forward, dscores
        # and dq passes backward.
        assert len(splits_used) == (4 if variant == "many-heads" else 2)
        assert any(n > 1 for n in splits_used) == split
    elif backend == "cuda":
        assert len(splits_used) == 2


@pytest.mark.parametrize("kind,batch,seq_len,heads", [
    ("holes", 3, 29, 2), ("packed", 1, 140, 3),  # below MANY_HEADS_MIN: per-head on triton
    ("holes", 3, 45, 4), ("packed", 3, 45, 16),  # from it on: many-head
])
def test_fp16_hidden_fp32_q_without_hidden_grad(kind, batch, seq_len, heads, backend, many_heads_calls):
    """R2M's case at the default variant threshold: a 16-bit frozen hidden (no dhidden: one
    program per head in triton's per-head backward) and an fp32 folded query."""
    check_against_reference(backend, kind, batch, seq_len, 40, heads, torch.float16, torch.float32,
                            hidden_grad=False, nan_pads=True)
    many = backend == "triton" and heads >= many_heads.MANY_HEADS_MIN
    assert many_heads_calls == (["forward", "backward"] if many else [])


@pytest.mark.parametrize("batch,seq_len", [(3, 37), (1, 150)], ids=["one-split", "split"])
def test_scores_far_below_exp_range(batch, seq_len, compiled_implementation, splits_used):
    """A stress test of the compiled backends against the torch one, whose own fp32 error is
    the yardstick here. Every score near -120 (lse < -88: exp(-lse) overflows fp32) with holes and NaN pads:
    masked positions must get weight 0, never exp(0 - lse) = inf times a zeroed row. Rows
    near the all-ones vector make delta = grad . pooled large against ds, so an output
    normalised by an fp32 lse of that size (off by ~4e-6) shows in dq. With one sequence of
    150 positions the compiled passes split (the host combines); with three of 37 they do not."""
    hidden64, _, mask, _ = make_inputs("holes", batch, seq_len, 40, 5, nan_pads=True)
    hidden64 = 1 + 0.1 * hidden64
    q64 = -3 + 0.1 * torch.randn(batch, 5, 40, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(batch, 5, 40, dtype=torch.float64, device=DEVICE)
    fast, ref, eager = run_with_references(compiled_implementation, hidden64, q64,
                                           (hidden64.float(), q64.float()), 1.0, mask, None, grad, True)
    for name, got, want, same_dtype in zip(("pooled", "dq", "dhidden"), fast, ref, eager):
        assert_within_rule(name, got, want, same_dtype, SLACK[torch.float32])
    assert any(n > 1 for n in splits_used) == (seq_len > 64)


def test_non_contiguous_inputs(implementation):
    """hidden, q and the incoming gradient as strided views (a transposed hidden, a
    transposed q, an expanded gradient)."""
    hidden64 = torch.randn(23, 3, 40, dtype=torch.float64, device=DEVICE).transpose(0, 1)  # (3, 23, 40)
    q64 = torch.randn(3, 40, 6, dtype=torch.float64, device=DEVICE).transpose(1, 2)        # (3, 6, 40)
    grad = torch.randn(1, 6, 40, dtype=torch.float64, device=DEVICE).expand(3, 6, 40)
    ref = pool_and_grads("torch", hidden64, q64, 0.2, None, None, grad, True)
    fast = pool_and_grads(implementation, hidden64.float(), q64.float(), 0.2, None, None, grad, True)
    for name, got, want in zip(("pooled", "dq", "dhidden"), fast, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend_name", params(["torch", "cuda"]))
def test_packed_equals_padded_with_mask(backend_name, monkeypatch):
    """Rows of right padding, left padding and holes, packed, give the padded result (triton's
    layouts are each held to float64 by the cases above)."""
    backend = use(backend_name, monkeypatch)
    dtype = torch.float32 if backend == "cuda" else torch.float64  # the cuda kernels take no fp64
    tol = SLACK[dtype]
    hidden = torch.randn(6, 23, 17, dtype=dtype, device=DEVICE)
    q = torch.randn(6, 2, 17, dtype=dtype, device=DEVICE)
    mask = make_mask(6, 23, "mixed").to(DEVICE)
    packed, cu_seqlens = pack(hidden, mask)
    grad = torch.randn(6, 2, 17, dtype=dtype, device=DEVICE)
    padded_out = pool_and_grads(backend, hidden, q, 0.5, mask, None, grad, True)
    packed_out = pool_and_grads(backend, packed, q, 0.5, None, cu_seqlens.to(DEVICE), grad, True)
    torch.testing.assert_close(packed_out[0], padded_out[0], rtol=tol, atol=tol)
    torch.testing.assert_close(packed_out[1], padded_out[1], rtol=tol, atol=tol)
    torch.testing.assert_close(packed_out[2], padded_out[2][mask], rtol=tol, atol=tol)
    assert (padded_out[2][~mask] == 0).all()  # padding receives no gradient


def test_integer_mask_equals_bool_mask(backend):
    hidden, q = torch.randn(3, 8, 6, device=DEVICE), torch.randn(3, 1, 6, device=DEVICE)
    mask = make_mask(3, 8, "holes").to(DEVICE)
    assert torch.equal(attention_pool(hidden, q, 1.0, mask=mask.long() * 7, backend=backend),
                       attention_pool(hidden, q, 1.0, mask=mask, backend=backend))


def test_a_dominant_position_takes_all_the_weight(backend):
    # A sign or scale error in the score would pick the wrong row here.
    hidden = torch.zeros(1, 4, 3, device=DEVICE)
    hidden[0, :, 0] = torch.tensor([1.0, -1.0, 0.5, 2.0])
    hidden[0, :, 1] = torch.arange(4.0)
    q = torch.tensor([[[50.0, 0.0, 0.0]]], device=DEVICE)
    out = attention_pool(hidden, q, 1.0, backend=backend)
    torch.testing.assert_close(out[0, 0], hidden[0, 3], rtol=0, atol=1e-6)
    masked = attention_pool(hidden, q, 1.0, mask=torch.tensor([[1, 1, 1, 0]], device=DEVICE), backend=backend)
    torch.testing.assert_close(masked[0, 0], hidden[0, 0], rtol=0, atol=1e-6)  # next best: row 0


@pytest.mark.parametrize("layout", ["holes", "left", "packed"])
@pytest.mark.parametrize("n_split", [1, 3])
def test_cuda_host_side_with_forced_splits(layout, n_split, cuda_contract, monkeypatch):
    """The cuda host code (scale folding, split combine, dq scaling, autograd) through the
    contract model: whatever number of splits the host picks, the result is the float64 one
    (3 splits of 40 positions: chunks of 16, 16 and 8, some with no valid position). Triton's
    splits are exercised by the cases above, on a pretend 2-SM device."""
    chosen = []
    monkeypatch.setattr(splits, "num_splits", lambda programs, seq_len, device: chosen.append(n_split) or n_split)
    mask = make_mask(3, 40, "holes" if layout == "holes" else "left")
    hidden64 = torch.randn(3, 40, 6, dtype=torch.float64)
    cu_seqlens = None
    if layout == "packed":
        hidden64, cu_seqlens = pack(hidden64, mask)
        mask = None
    q64 = torch.randn(3, 2, 6, dtype=torch.float64)
    grad = torch.randn(3, 2, 6, dtype=torch.float64)
    ref = pool_and_grads("torch", hidden64, q64, 0.7, mask, cu_seqlens, grad, True)
    got = pool_and_grads("cuda", hidden64.float(), q64.float(), 0.7, mask, cu_seqlens, grad, True)
    for name, g, r in zip(("pooled", "dq", "dhidden"), got, ref):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)
    assert chosen == [n_split, n_split]
    assert cuda_contract.calls == [("attention_pool_forward", n_split), ("attention_pool_backward", n_split)]


# ------------------------------------------------------- 16-bit overflow, strided offsets, second derivatives

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_large_16bit_hidden_states_stay_finite_and_accurate(dtype, backend):
    """Hidden states near 1e4 in a 16-bit dtype (finite: fp16 holds up to 65504) whose scores
    q . h overflow fp16 before the scale: softmax and both products are fp32 (§3), so the
    result is the float64 one up to rounding, never NaN."""
    hidden = (torch.randn(3, 7, 64, dtype=torch.float64) * 1e4).to(dtype).to(DEVICE)
    q = torch.randn(3, 2, 64, device=DEVICE)
    mask = make_mask(3, 7, "holes").to(DEVICE)
    grad = torch.randn(3, 2, 64, dtype=torch.float64, device=DEVICE)
    got = pool_and_grads(backend, hidden, q, 1e-4, mask, None, grad, True)
    want = pool_and_grads("torch", hidden.double(), q.double(), 1e-4, mask, None, grad.to(dtype).double(), True)
    for name, g, w in zip(("pooled", "dq", "dhidden"), got, want):
        assert torch.isfinite(g).all(), name
        err, size = (g.double() - w).abs().max().item(), w.abs().max().item()
        assert err <= 4 * SLACK[dtype] * size, f"{name}: error {err:.3g} for values up to {size:.3g}"


def test_strided_cu_seqlens(backend):
    """cu_seqlens taken with a stride (every other entry of a longer tensor) give the result
    of the same offsets made contiguous (§8: any stride is accepted)."""
    hidden = torch.randn(20, 12, device=DEVICE)
    q = torch.randn(4, 2, 12, device=DEVICE)
    interleaved = torch.tensor([0, -1, 3, -1, 4, -1, 11, -1, 20, -1], dtype=torch.int32, device=DEVICE)
    strided = interleaved[::2]
    assert not strided.is_contiguous()
    grad = torch.randn(4, 2, 12, device=DEVICE)
    want = pool_and_grads(backend, hidden, q, 0.6, None, strided.contiguous(), grad, True)
    got = pool_and_grads(backend, hidden, q, 0.6, None, strided, grad, True)
    for name, g, w in zip(("pooled", "dq", "dhidden"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    reference = pool_and_grads("torch", hidden.double(), q.double(), 0.6, None, strided.contiguous(),
                               grad.double(), True)
    for name, g, r in zip(("pooled", "dq", "dhidden"), got, reference):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)


def test_second_derivative_is_right_or_a_clear_error(backend):
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q = torch.randn(2, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]], device=DEVICE)  # a hole, left padding
    check_second_derivative("attention_pool", backend,
                            lambda h, q: attention_pool(h, q, 0.8, mask=mask, backend=backend), (hidden, q))


def test_reference_gradcheck():
    hidden = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda h, q: attention_pool(h, q, 0.8, mask=mask, backend="torch"),
                                    (hidden, q))


# ------------------------------------------------------- triton's variants

@pytest.mark.interpreter
@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads", [("holes", 1, 37, 40, 16), ("packed", 2, 70, 24, 5)])
def test_triton_per_head_variant_at_many_heads(kind, batch, seq_len, d_p, heads, request):
    """The per-head kernels stay correct above the threshold (dhidden summed over heads)."""
    use_variant(request, "per-head")
    check_against_reference("triton", kind, batch, seq_len, d_p, heads, torch.float32, torch.float32,
                            hidden_grad=True, nan_pads=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("heads,dtype,many", [
    (1, torch.float32, False), (3, torch.float16, False), (many_heads.MANY_HEADS_MIN, torch.float32, True),
    (32, torch.float16, True), (16, torch.float64, False)])
def test_triton_variant_selection(heads, dtype, many, many_heads_calls):
    """Below MANY_HEADS_MIN heads (n_h = 1 included) and for fp64 the per-head kernels run;
    from it on, the many-head ones, forward and backward."""
    hidden, q, _, _ = make_inputs("dense", 1, 3, 16, heads)
    pool_and_grads("triton", hidden.to(dtype), q.to(dtype), 0.5, None, None,
                   torch.randn(1, heads, 16, device=DEVICE), True)
    assert many_heads_calls == (["forward", "backward"] if many else [])


@pytest.mark.interpreter
@pytest.mark.parametrize("kind,heads", [("holes", 2), ("packed", 1)])
def test_triton_float64_matches_reference_tightly(kind, heads):
    """fp64 hidden accumulates in fp64, so the kernels match the reference to rounding."""
    hidden, q, mask, cu_seqlens = make_inputs(kind, 3, 40, 23, heads)
    grad = torch.randn(3, heads, 23, dtype=torch.float64, device=DEVICE)
    ref = pool_and_grads("torch", hidden, q, 0.4, mask, cu_seqlens, grad, True)
    fast = pool_and_grads("triton", hidden, q, 0.4, mask, cu_seqlens, grad, True)
    for name, got, want in zip(("pooled", "dq", "dhidden"), fast, ref):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12, msg=name)


def test_compiled_op_registration(compiled_implementation):
    """Schema, fake (meta) implementation and autograd registration of each compiled op agree
    with the real implementation (torch.library.opcheck)."""
    op = {"triton": triton_pool._pool_op, "cuda": cuda_pool._pool_op}[compiled_implementation]
    hidden, q, mask, _ = make_inputs("holes", 2, 9, 12, 2)
    hidden, q = hidden.float().requires_grad_(), q.float().requires_grad_()
    torch.library.opcheck(op, (hidden, q, 0.5, mask, None))


# ------------------------------------------------------- GPU, realistic sizes

# (kind, B, S, D_p, n_h) per backend. cuda: its vector path (D_p % 8 == 0) and scalar one (odd
# D_p), each column count its launcher picks (D_p <= 2048, <= 8192, <= 16384), S = 1, many
# heads, and long sequences that take the flash-decoding split.
GPU_CASES = [("triton", case) for case in [
    ("dense", 16, 1000, 4096, 1),
    ("left", 8, 1024, 2048, 1),
    ("holes", 4, 777, 1000, 4),
    ("packed", 6, 1500, 4096, 1),
    ("holes", 4, 512, 1536, 16),
    ("dense", 1, 32768, 2048, 1),    # long sequence, split path
    ("packed", 2, 16384, 896, 32),
]] + [("cuda", case) for case in [
    ("dense", 64, 1024, 4096, 1),
    ("holes", 8, 1000, 1000, 3),
    ("left", 4, 777, 4099, 1),
    ("packed", 16, 1024, 2048, 16),
    ("holes", 2, 32768, 4096, 1),
    ("dense", 3, 1, 37, 2),
    ("packed", 5, 600, 16384, 1),
    ("left", 6, 300, 12000, 5),
]]


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name,case", GPU_CASES, ids=[f"{b}-{'-'.join(map(str, c))}" for b, c in GPU_CASES])
@GPU_DTYPES
@HIDDEN_GRADS
def test_gpu_matches_float64_reference(backend_name, case, dtype, hidden_grad):
    check_against_reference(backend_name, *case, dtype, torch.float32, hidden_grad, nan_pads=True)


# Both triton variants at many heads and realistic sizes: docs/design.md §6 `heads` cut to
# B = 64, n_h 32, n_h and D_p not powers of two, and a long packed sequence (split path).
GPU_HEAD_CASES = [
    ("dense", 64, 1024, 4096, 16),
    ("left", 16, 1024, 4096, 32),
    ("holes", 8, 1500, 2000, 12),
    ("packed", 2, 16384, 1536, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads", GPU_HEAD_CASES)
@GPU_DTYPES
@HIDDEN_GRADS
@pytest.mark.parametrize("variant", ["many-heads", "per-head"])
def test_gpu_many_heads_match_float64_reference(kind, batch, seq_len, d_p, heads, dtype,
                                                hidden_grad, variant, request):
    use_variant(request, variant)
    check_against_reference("triton", kind, batch, seq_len, d_p, heads, dtype, torch.float32, hidden_grad,
                            nan_pads=True)


@pytest.mark.gpu
def test_gpu_many_heads_peak_extra_memory():
    """At docs/design.md §6 `heads` (B 512, S 1024, D_p 4096, n_h 16, bf16) the many-head
    variant's memory beyond inputs and outputs is its fp32 (n_h, B * S) buffer, 32 MiB, in the
    forward and in the backward (dq alone, and with dhidden)."""
    batch, seq_len, d_p, heads = 512, 1024, 4096, 16
    hidden = torch.randn(batch, seq_len, d_p, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, d_p, device="cuda")
    grad = torch.randn(batch, heads, d_p, device="cuda", dtype=torch.bfloat16)
    buffer = 4 * heads * batch * seq_len

    def extra(call):
        call()  # autotuning allocates its own scratch: keep it out of the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        outputs = call()
        torch.cuda.synchronize()
        kept = sum(t.numel() * t.element_size() for t in outputs)
        return torch.cuda.max_memory_allocated() - before - kept

    pooled, lse = many_heads.pool_forward(hidden, q, 0.1, None, None)
    assert extra(lambda: many_heads.pool_forward(hidden, q, 0.1, None, None)) <= buffer + 2**20
    for need_dhidden in (False, True):
        used = extra(lambda: many_heads.pool_backward(grad, hidden, q, pooled, lse, 0.1, None, None,
                                                     need_dhidden))
        assert used <= buffer + 2**20, f"need_dhidden={need_dhidden}: {used / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("n_split", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_cuda_matches_triton(n_split, dtype, monkeypatch):
    """The two compiled backends agree on the same inputs, forcing the number of splits
    (each backend is also held to float64 above)."""
    monkeypatch.setattr(splits, "num_splits", lambda programs, seq_len, device: n_split)
    hidden, q, mask, cu = make_inputs("holes", 6, 700, 2048, 4, "cuda")
    grad = torch.randn(6, 4, 2048, dtype=torch.float64, device="cuda")
    low = (hidden.to(dtype), q.float())
    got = pool_and_grads("cuda", *low, 0.05, mask, cu, grad, True)
    want = pool_and_grads("triton", *low, 0.05, mask, cu, grad, True)
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    for name, g, w in zip(("pooled", "dq", "dhidden"), got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.gpu
def test_gpu_cuda_unaligned_rows_and_poisoned_outputs():
    """Rows whose stride is not a multiple of 16 bytes take the scalar path; every output the
    kernels write comes from freed memory first filled with NaN (the caching allocator hands
    it out again), so a position they skip shows up as NaN."""
    wide = torch.randn(4, 300, 2056, dtype=torch.float64, device="cuda")
    hidden64 = wide[..., :2051]  # row stride 2056, last dim contiguous
    q64 = torch.randn(4, 2, 2051, dtype=torch.float64, device="cuda")
    grad = torch.randn(4, 2, 2051, dtype=torch.float64, device="cuda")
    ref = pool_and_grads("torch", hidden64, q64, 0.03, None, None, grad, True)
    torch.full((1 << 26,), float("nan"), device="cuda")  # freed at once, memory stays cached
    got = pool_and_grads("cuda", hidden64.to(torch.bfloat16), q64.float(), 0.03, None, None, grad, True)
    for name, g, r in zip(("pooled", "dq", "dhidden"), got, ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2, msg=name)
