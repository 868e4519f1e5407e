"""The torch backend of attention_pool against the float64 loop, forward and both gradients."""

import pytest
import torch

from r2m_kernels import attention_pool
from tests.inputs import MASK_KINDS, make_mask, pack
from tests.loops import attention_pool_loop


def grads(out, inputs, seed):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * g).sum(), inputs, retain_graph=True)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("batch, seq_len, dim, heads", [(3, 1, 5, 1), (2, 37, 19, 3), (4, 9, 33, 2)])
def test_matches_the_float64_loop(mask_kind, batch, seq_len, dim, heads):
    hidden = torch.randn(batch, seq_len, dim, dtype=torch.float64, requires_grad=True)
    q = torch.randn(batch, heads, dim, dtype=torch.float64, requires_grad=True)
    mask = make_mask(batch, seq_len, mask_kind)
    scale = 0.37
    got = attention_pool(hidden, q, scale, mask=mask, backend="torch")
    want = attention_pool_loop(hidden, q, scale, mask)
    assert got.shape == (batch, heads, dim) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads(got, (hidden, q), 1), grads(want, (hidden, q), 1)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if mask is not None:  # padding contributes nothing and receives no gradient
        assert (grads(got, (hidden,), 2)[0][~mask] == 0).all()


def test_gradcheck():
    hidden = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda h, q: attention_pool(h, q, 0.8, mask=mask, backend="torch"),
                                    (hidden, q))


@pytest.mark.parametrize("mask_kind", ["right", "left", "holes"])
def test_packed_equals_padded_with_mask(mask_kind):
    batch, seq_len, dim, heads = 5, 23, 17, 2
    hidden = torch.randn(batch, seq_len, dim, dtype=torch.float64)
    q = torch.randn(batch, heads, dim, dtype=torch.float64)
    mask = make_mask(batch, seq_len, mask_kind)
    packed, cu_seqlens = pack(hidden, mask)
    packed.requires_grad_(True)
    hidden.requires_grad_(True)
    q.requires_grad_(True)
    padded_out = attention_pool(hidden, q, 0.5, mask=mask, backend="torch")
    packed_out = attention_pool(packed, q, 0.5, cu_seqlens=cu_seqlens, backend="torch")
    torch.testing.assert_close(packed_out, padded_out, rtol=1e-12, atol=1e-12)
    g_pad_h, g_pad_q = grads(padded_out, (hidden, q), 3)
    g_pack_h, g_pack_q = grads(packed_out, (packed, q), 3)
    torch.testing.assert_close(g_pack_q, g_pad_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_pack_h, g_pad_h[mask], rtol=1e-12, atol=1e-12)


def test_integer_mask_equals_bool_mask():
    hidden, q = torch.randn(3, 8, 6), torch.randn(3, 1, 6)
    mask = make_mask(3, 8, "holes")
    torch.testing.assert_close(attention_pool(hidden, q, 1.0, mask=mask.long(), backend="torch"),
                               attention_pool(hidden, q, 1.0, mask=mask, backend="torch"))


def test_a_dominant_position_takes_all_the_weight():
    # A sign or scale error in the score would pick the wrong row here.
    hidden = torch.zeros(1, 4, 3, dtype=torch.float64)
    hidden[0, :, 0] = torch.tensor([1.0, -1.0, 0.5, 2.0])
    hidden[0, :, 1] = torch.arange(4.0)
    q = torch.tensor([[[50.0, 0.0, 0.0]]], dtype=torch.float64)
    out = attention_pool(hidden, q, 1.0, backend="torch")
    torch.testing.assert_close(out[0, 0], hidden[0, 3], rtol=0, atol=1e-12)
    masked = attention_pool(hidden, q, 1.0, mask=torch.tensor([[1, 1, 1, 0]]), backend="torch")
    torch.testing.assert_close(masked[0, 0], hidden[0, 0], rtol=0, atol=1e-9)  # next best: row 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_hidden_with_fp32_query(dtype):
    hidden = torch.randn(3, 21, 24).to(dtype)
    q = torch.randn(3, 2, 24) * 0.3
    mask = make_mask(3, 21, "holes")
    out = attention_pool(hidden, q, 0.5, mask=mask, backend="torch")
    assert out.dtype == dtype and out.shape == (3, 2, 24)
    want = attention_pool_loop(hidden, q, 0.5, mask)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_non_contiguous_inputs():
    base = torch.randn(3, 24, 10, dtype=torch.float64)
    hidden = base.transpose(1, 2)[:, :, ::2]  # (3, 10, 12), strided
    q = torch.randn(2, 3, 12, dtype=torch.float64).transpose(0, 1)  # (3, 2, 12)
    assert not hidden.is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(attention_pool(hidden, q, 0.3, backend="torch"),
                               attention_pool_loop(hidden, q, 0.3))
