"""Inputs and checks shared by the attention-pool tests of every backend.

The rule (docs/design.md §5): a compiled backend's max error against float64 is at most twice
the error of the torch backend run in the same dtype, plus a small slack relative to the
result's size. The torch backend itself, whose fp32 math rounds only the result to a 16-bit
dtype, is held to the slack alone against float64 on the same rounded inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import r2m_kernels

from tests.support.backends import DEVICE

SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# The parametrisations every GPU attention-pool test takes.
GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                                     ids=["bf16", "fp16", "fp32"])
HIDDEN_GRADS = pytest.mark.parametrize("hidden_grad", [False, True], ids=["dq", "dq+dhidden"])


def make_inputs(kind, batch, seq_len, d_p, heads, device=DEVICE, nan_pads=False):
    """float64 hidden, q and the layout: mask for padded kinds, cu_seqlens for "packed".

    kinds: "dense" (no mask), "holes" (random holes, every row keeps a position), "left"
    (left padding of different lengths, one longer than half the row, as an int64 mask),
    "packed" (ragged lengths including 1 and seq_len). nan_pads: NaN in hidden's masked-out
    rows (real models' pad positions can hold any value; the result must not see them)."""
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
            if nan_pads:
                hidden[~mask.bool()] = float("nan")
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
    """got's max error against ref64 is at most 2x that of same_dtype_torch plus the slack
    relative to the result's size; with same_dtype_torch None, the slack alone."""
    assert got is not None and torch.isfinite(got).all(), f"{name}: missing or non-finite values"
    err = (got.double() - ref64).abs().max().item()
    err_torch = 0.0 if same_dtype_torch is None else (same_dtype_torch.double() - ref64).abs().max().item()
    bound = 2 * err_torch + slack * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x torch's {err_torch:.3g} + slack ({bound:.3g})"


def run_with_references(backend, hidden64, q64, low, scale, mask, cu_seqlens, grad, hidden_grad):
    """(pooled, dq, dhidden) of `backend` on the low-precision inputs `low` = (hidden, q),
    the float64 reference, and the torch backend on `low` (None for the torch backend itself,
    whose reference is float64 on the same rounded inputs: see the module docstring)."""
    fast = pool_and_grads(backend, *low, scale, mask, cu_seqlens, grad, hidden_grad)
    if backend == "torch":
        rounded = (low[0].double(), low[1].double())
        ref = pool_and_grads("torch", *rounded, scale, mask, cu_seqlens, grad.to(low[0].dtype).double(), True)
        return fast, ref, (None, None, None)
    ref = pool_and_grads("torch", hidden64, q64, scale, mask, cu_seqlens, grad, True)
    return fast, ref, pool_and_grads("torch", *low, scale, mask, cu_seqlens, grad, hidden_grad)


def check_against_reference(backend, kind, batch, seq_len, d_p, heads, dtype, q_dtype, hidden_grad,
                            device=DEVICE, nan_pads=False):
    """`backend` in `dtype` (q in q_dtype) against the torch backend in float64, forward and
    the gradients of q (and hidden when hidden_grad), under the rule of the module docstring."""
    hidden64, q64, mask, cu_seqlens = make_inputs(kind, batch, seq_len, d_p, heads, device, nan_pads)
    scale = 2.0 / math.sqrt(d_p)
    grad = torch.randn(batch, heads, d_p, dtype=torch.float64, device=device)
    fast, ref, eager = run_with_references(backend, hidden64, q64, (hidden64.to(dtype), q64.to(q_dtype)),
                                           scale, mask, cu_seqlens, grad, hidden_grad)
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
