"""The `cuda` backend of attention_pool: host side of csrc/attention_pool.cu.

The kernels (see csrc/r2m_cuda.h) read hidden once forward and once backward, with 16-byte
vector loads and fp32 math; this module folds the scale into q, picks the flash-decoding
split, combines the splits and scales dq, exactly as the triton backend does (splits.py,
custom_ops.py).
"""

from __future__ import annotations

import torch

from .. import dispatch, splits
from ..custom_ops import define_attention_pool_op
from .extension import module, why_not_device

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D_P = 16384
MAX_HEADS = 64


def why_not_inputs(inputs) -> str | None:
    """None when the kernels take the validated attention_pool inputs, else the reason."""
    hidden, heads = inputs.hidden, inputs.q.shape[1]
    if hidden.dtype not in DTYPES:
        return f"the CUDA kernels take hidden in float32, float16 or bfloat16, got {hidden.dtype}"
    if hidden.shape[-1] > MAX_D_P or heads > MAX_HEADS:
        return (f"the CUDA kernels take D_p <= {MAX_D_P} and n_h <= {MAX_HEADS}, got D_p = "
                f"{hidden.shape[-1]}, n_h = {heads}")
    return None


def _rows(hidden, cu_seqlens):
    """(hidden with a contiguous last dim, batch size, a typical sequence length)."""
    rows = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    return (rows, *splits.sequences(hidden, cu_seqlens))


def _forward(hidden, q, scale, mask, cu_seqlens):
    rows, batch, typical = _rows(hidden, cu_seqlens)
    n_split = splits.num_splits(batch * q.shape[1], typical, hidden.device)
    q_scaled = (q.float() * scale).contiguous()
    out, lse = module().attention_pool_forward(rows, q_scaled, mask, cu_seqlens, n_split)
    if n_split == 1:
        return out[0], lse[0]
    return splits.combine_splits(out, lse, torch.float32)


def _backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden):
    rows, batch, typical = _rows(hidden, cu_seqlens)
    # With dhidden one block owns a chunk of rows and loops over the heads.
    programs = batch if need_dhidden else batch * q.shape[1]
    n_split = splits.num_splits(programs, typical, hidden.device)
    grad = grad.float().contiguous()
    delta = (grad * pooled.float()).sum(dim=-1).contiguous()  # D_j = dp_j . p_j
    q_scaled = (q.float() * scale).contiguous()
    dq, dhidden = module().attention_pool_backward(rows, q_scaled, mask, cu_seqlens, grad,
                                                    lse.float().contiguous(), delta, scale, n_split,
                                                    need_dhidden)
    return dq.sum(dim=0).to(q.dtype), dhidden


_pool_op = define_attention_pool_op("attention_pool_cuda", _forward, _backward)


def attention_pool_cuda(hidden, q, scale, mask=None, cu_seqlens=None):
    """The `cuda` backend of attention_pool (inputs already validated).

    hidden (B, S, D_p) [+ mask (B, S)] or (N, D_p) + cu_seqlens (B+1,) int32, fp16/bf16/fp32,
    D_p <= MAX_D_P, on a GPU; q (B, n_h, D_p) of any float dtype, n_h <= MAX_HEADS. Returns
    pooled (B, n_h, D_p) in hidden.dtype; differentiable in q and hidden.
    """
    return _pool_op(hidden, q, float(scale), mask, cu_seqlens)[0].to(hidden.dtype)


dispatch.register("attention_pool", "cuda", attention_pool_cuda, why_not_device, why_not_inputs)
