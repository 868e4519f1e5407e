"""The attention pool's row layout, shared by its two variants (attention_pool.py, one program
per head; attention_pool_many_heads.py, tensor-core dots over all heads): where each
sequence's rows are, the flash-decoding chunk of a program, the validity of a row-block, and
the allocation of every buffer the kernels write.

Layouts: padded hidden (B, S, D_p) with an optional (B, S) mask of any pattern, or packed
hidden (N, D_p) with (B+1,) int32 cu_seqlens. Either way sequence b's rows are rows
[row0, row0 + seqlen) of hidden viewed as (rows, D_p): row0 = b * S padded, cu_seqlens[b]
packed; buffers indexed by row (scores, dhidden) use that row index.

`empty` is called through this module (pool_layout.empty) so that tests can replace it, to
poison every buffer with NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..splits import sequences


@triton.jit
def sequence(b, S, cu_seqlens, hidden, stride_hb, stride_hs, PACKED: tl.constexpr):
    """(first row of sequence b counted in rows of hidden, its length, pointer to its row 0)."""
    if PACKED:
        row0 = tl.load(cu_seqlens + b).to(tl.int64)
        seqlen = tl.load(cu_seqlens + b + 1).to(tl.int64) - row0
        base = hidden + row0 * stride_hs
    else:
        row0 = b.to(tl.int64) * S
        seqlen = S
        base = hidden + b.to(tl.int64) * stride_hb
    return row0, seqlen, base


@triton.jit
def chunk(seqlen, split, n_split, BLOCK_S: tl.constexpr):
    """Positions [start, stop) of this split: equal chunks, each a whole number of blocks."""
    size = tl.cdiv(tl.cdiv(seqlen, n_split), BLOCK_S) * BLOCK_S
    start = split * size
    return start, tl.minimum(start + size, seqlen)


@triton.jit
def valid_rows(mask, b, offs_s, stop, stride_mb, stride_ms, HAS_MASK: tl.constexpr):
    """(BLOCK_S,) validity of positions offs_s of sequence b: before `stop` and kept by the mask."""
    valid = offs_s < stop
    if HAS_MASK:
        keep = tl.load(mask + b.to(tl.int64) * stride_mb + offs_s * stride_ms, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def load_rows(base, valid, offs_s, offs_d, D, stride_hs, stride_hd):
    """(BLOCK_S, BLOCK_D) tile of a sequence's rows in hidden's dtype, zero where the row is
    not valid or the column is past D (pad rows may hold NaN: they are never read)."""
    ptrs = base + offs_s[:, None].to(tl.int64) * stride_hs + offs_d[None, :] * stride_hd
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


def empty(shape, dtype, device):
    """Allocation of every buffer the kernels write in full (tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


class PoolLayout(NamedTuple):
    """The kernel arguments that describe hidden's rows, shared by both directions and both
    variants."""
    batch: int  # B
    seq_len: int  # S padded, 0 packed
    packed: bool  # the PACKED constexpr
    has_mask: bool  # the HAS_MASK constexpr
    mask: torch.Tensor  # (mask != 0) as uint8, or hidden as a dummy never read
    stride_mb: int  # the mask's strides (0 without one)
    stride_ms: int
    cu_seqlens: torch.Tensor  # cu_seqlens, or hidden as a dummy never read (padded)
    stride_hb: int  # hidden's batch stride (0 packed)
    typical: int  # a typical sequence length, for choosing splits
    rows: int  # rows of hidden: B * S padded, N packed


def layout(hidden, mask, cu_seqlens) -> PoolLayout:
    """The PoolLayout of padded hidden (B, S, D_p) [+ mask (B, S)] or packed hidden (N, D_p) +
    cu_seqlens (B+1,)."""
    packed = cu_seqlens is not None
    batch, typical = sequences(hidden, cu_seqlens)
    seq_len, stride_hb = (0, 0) if packed else (hidden.shape[1], hidden.stride(0))
    if mask is not None:
        mask_bytes = (mask != 0).view(torch.uint8)
        mask_args = (mask_bytes, mask_bytes.stride(0), mask_bytes.stride(1))
    else:
        mask_args = (hidden, 0, 0)  # never read: HAS_MASK is False
    return PoolLayout(batch=batch, seq_len=seq_len, packed=packed, has_mask=mask is not None,
                      mask=mask_args[0], stride_mb=mask_args[1], stride_ms=mask_args[2],
                      cu_seqlens=cu_seqlens if packed else hidden, stride_hb=stride_hb,
                      typical=typical, rows=hidden.numel() // hidden.shape[-1])
