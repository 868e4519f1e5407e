"""A plain Triton read loop: the read-only bandwidth that sets the benchmark's floor.

Each program reads one block of the buffer and writes the block's fp32 sum, so the kernel
reads every byte once and writes next to nothing. Its time is the least any kernel needs to
read that many bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192


@triton.jit
def _read_sum_kernel(x_ptr, partial_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    block = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0)
    tl.store(partial_ptr + pid, tl.sum(block.to(tl.float32), axis=0))


def read_sum_partials_buffer(x: torch.Tensor) -> torch.Tensor:
    """The fp32 (ceil(numel / BLOCK),) buffer that read_sum writes its block sums into."""
    return torch.empty(triton.cdiv(x.numel(), BLOCK), device=x.device, dtype=torch.float32)


def read_sum(x: torch.Tensor, partials: torch.Tensor) -> torch.Tensor:
    """Block sums of a contiguous 1-D tensor `x` into `partials` (see read_sum_partials_buffer);
    partials.sum() is x.sum() in fp32."""
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1-D tensor, got shape {tuple(x.shape)}")
    blocks = triton.cdiv(x.numel(), BLOCK)
    if partials.shape != (blocks,) or partials.dtype != torch.float32:
        raise ValueError(f"partials must be fp32 of shape ({blocks},), got {partials.dtype} {tuple(partials.shape)}")
    _read_sum_kernel[(blocks,)](x, partials, x.numel(), BLOCK=BLOCK, num_warps=8)
    return partials
