"""The flash-decoding split of the attention pool (docs/design.md §2.2), shared by the compiled
backends (triton, cuda) so that both choose and combine splits alike.

When the B * n_h programs of a launch cannot fill the GPU, each sequence is cut into
n_split chunks handled by separate programs; every chunk writes a softmax-normalised partial
result and its log-sum-exp, and `combine_splits` weighs the partials by their softmax mass.

Callers reach these through the module (`splits.num_splits(...)`), so that tests and tools
can replace them: to force a number of splits, or to pretend to be a GPU of a given size.
"""

from __future__ import annotations

import torch

# Each flash-decoding split gets at least this many positions, so splitting never makes the
# per-program work smaller than the combine it costs.
MIN_ROWS_PER_SPLIT = 64

# Off the GPU (the Triton interpreter, the cuda contract model) a pretend 2-SM device, so that
# tests take the split path at small batches.
PRETEND_MULTIPROCESSORS = 2


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; PRETEND_MULTIPROCESSORS off the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return PRETEND_MULTIPROCESSORS


def sequences(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    """(B, a typical sequence length for choosing splits): S of padded (B, S, D_p) hidden,
    ceil(N / B) of packed (N, D_p) hidden."""
    if cu_seqlens is None:
        return hidden.shape[0], hidden.shape[1]
    batch = cu_seqlens.shape[0] - 1
    return batch, -(-hidden.shape[0] // batch)


def num_splits(programs: int, seq_len: int, device: torch.device) -> int:
    """Splits per sequence for a launch of `programs` programs: enough for about two waves of
    the GPU, never chunks shorter than MIN_ROWS_PER_SPLIT positions."""
    wanted = -(-2 * multiprocessor_count(device) // programs)
    return max(1, min(wanted, -(-seq_len // MIN_ROWS_PER_SPLIT)))


def combine_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """Flash-decoding combine of per-split results: out (n_split, B, n_h, D) softmax-normalised
    partial outputs and lse (n_split, B, n_h) their log-sum-exps, in the accumulation dtype.
    Each split is weighted by its share of the total softmax mass (a split with no valid
    position has lse = -inf and weight 0). Returns (pooled (B, n_h, D) in `dtype`, lse (B, n_h))."""
    total = torch.logsumexp(lse, dim=0)
    pooled = (torch.exp(lse - total)[..., None] * out).sum(dim=0)
    return pooled.to(dtype), total
