"""The `cuda` backend of grebt_loss: host side of csrc/grebt.cu, whose one launch writes every
group's loss and d loss / d rewards (one warp per group up to 512 rewards, a block per larger
group); backward only scales that gradient (custom_ops.define_grebt_op)."""

from __future__ import annotations

import torch

from .. import dispatch
from ..custom_ops import define_grebt_op
from ..grebt_host import grebt_groups, grebt_loss_over
from .extension import module, why_not_device

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GROUP_SIZE = 16384


def _forward(rewards, group_size, cu_groups, max_group, alpha, eps, reduction, write_grad):
    num_groups, k_max = grebt_groups(rewards, group_size, cu_groups, max_group)
    if k_max > MAX_GROUP_SIZE:  # reached only by direct calls: dispatch's probe refuses these
        raise ValueError(f"grebt_loss backend='cuda' takes groups of up to {MAX_GROUP_SIZE} "
                         f"rewards, got a group of {k_max}; use backend='torch'")
    loss_scale = 1.0 / num_groups if reduction == "mean" else 1.0
    per_group, grad = module().grebt_loss_forward(
        rewards.contiguous(), group_size or 0, cu_groups, num_groups, k_max, alpha, eps,
        loss_scale, write_grad)
    return (per_group if reduction == "none" else per_group.sum()), grad


_grebt_op = define_grebt_op("grebt_loss_cuda", _forward)


def why_not_inputs(inputs) -> str | None:
    """None when the kernel takes the validated grebt_loss inputs, else the reason."""
    if inputs.rewards.dtype not in DTYPES:
        return f"the CUDA GREBT kernel takes float32, float16 or bfloat16 rewards, got {inputs.rewards.dtype}"
    if inputs.max_group is not None and inputs.max_group > MAX_GROUP_SIZE:
        return (f"the CUDA GREBT kernel takes groups of up to {MAX_GROUP_SIZE} rewards, got a group "
                f"of {inputs.max_group}")
    return None


grebt_loss_cuda = grebt_loss_over(_grebt_op, "grebt_loss_cuda", """\
    GREBT loss (docs/design.md §1.3) on the GPU; same semantics as reference.grebt_loss_torch.

    rewards (B,) fp16/bf16/fp32 (math in fp32); uniform groups of `group_size` or ragged
    groups given by cu_groups (G+1,) int32 (max_group: the largest, when known), each of at
    most MAX_GROUP_SIZE rewards. Returns a scalar for "mean"/"sum", (G,) for "none"; fp32.
    """)


dispatch.register("grebt_loss", "cuda", grebt_loss_cuda, why_not_device, why_not_inputs)
