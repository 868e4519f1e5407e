"""The dtype policy every backend follows: in which dtype softmax and accumulation run."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax and accumulation math for inputs of `dtype`: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
