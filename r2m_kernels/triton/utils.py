"""Helpers the Triton kernels and their host code share.

- Where Triton can run (`why_not_device`), the accumulation dtypes as Triton types (TL_ACC),
  and fp64 scalars passed as fp32 pairs (split_scalar / join_scalar).
- The attention pool's row layout, shared by its two variants (attention_pool.py, one program
  per head; attention_pool_many_heads.py, tensor-core dots over all heads): where each
  sequence's rows are, the flash-decoding chunk of a program, the validity of a row-block, and
  the allocation of every buffer the kernels write.

Layouts: padded hidden (B, S, D_p) with an optional (B, S) mask of any pattern, or packed
hidden (N, D_p) with (B+1,) int32 cu_seqlens. Either way sequence b's rows are rows
[row0, row0 + seqlen) of hidden viewed as (rows, D_p): row0 = b * S padded, cu_seqlens[b]
packed; buffers indexed by row (scores, dhidden) use that row index.

`empty` is called through this module (utils.empty) so that tests can replace it, to poison
every buffer with NaN.
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

from ..splits import sequences

# Triton reads TRITON_INTERPRET when a kernel is defined; on CPU tensors the kernels can run
# only in the interpreter, which is for tests.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The kernels' ACC constexpr for each accumulation dtype (precision.accumulation_dtype).
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

_FP32_MAX = 3.4028234663852886e38


def why_not_device(device: torch.device) -> str | None:
    """None when Triton kernels can run on tensors of `device`, else the reason."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import to run "
            f"them in the interpreter on the CPU); got tensors on {device}")


def split_scalar(x: float):
    """x as two fp32-exact floats (hi, lo) with hi + lo = x to ~48 bits: Triton passes Python
    floats to kernels as fp32, which would round the fp64 math's constants."""
    # Beyond fp32's range (only an absurd eps gets there) the largest float stands in for inf,
    # which would turn eps / (std + eps) into NaN.
    x = max(-_FP32_MAX, min(_FP32_MAX, x))
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def join_scalar(hi, lo, ACC: tl.constexpr):
    """The inverse of split_scalar, in the math's dtype (fp32: just hi)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


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


def layout(hidden, mask, cu_seqlens):
    """Kernel arguments shared by both directions and both variants: B, S (0 packed), the
    layout constexprs, the mask as uint8 (or a dummy) and its strides, cu_seqlens (or a
    dummy), hidden's batch stride, a typical sequence length for choosing splits, and the
    number of rows of hidden (B * S padded, N packed)."""
    packed = cu_seqlens is not None
    batch, typical = sequences(hidden, cu_seqlens)
    seq_len, stride_hb = (0, 0) if packed else (hidden.shape[1], hidden.stride(0))
    if mask is not None:
        mask = (mask != 0).view(torch.uint8)
        mask_args = (mask, mask.stride(0), mask.stride(1))
    else:
        mask_args = (hidden, 0, 0)  # never read: HAS_MASK is False
    return dict(batch=batch, seq_len=seq_len, packed=packed, has_mask=mask is not None,
                mask_args=mask_args, cu_seqlens=cu_seqlens if packed else hidden,
                stride_hb=stride_hb, typical=typical,
                rows=hidden.numel() // hidden.shape[-1])
