"""Host code of grebt_loss shared by the compiled backends (triton, cuda): group counts, the
gradient of the op's backward, and the backend function over a backend's custom op.

Each backend's kernel writes every group's loss and d loss / d rewards in one launch
(custom_ops.define_grebt_op makes the op); what is left on the host is the same for both.
"""

from __future__ import annotations

from typing import Callable

import torch


def grebt_groups(rewards: torch.Tensor, group_size: int | None, cu_groups: torch.Tensor | None,
                 max_group: int | None = None) -> tuple[int, int]:
    """(number of groups, largest group size). Ragged groups cost one host sync unless the
    caller already knows the largest group (validation measures it)."""
    if cu_groups is None:
        return rewards.shape[0] // group_size, group_size
    if max_group is None:
        max_group = int((cu_groups[1:] - cu_groups[:-1]).max())
    return cu_groups.numel() - 1, max_group


def grad_from_saved(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str,
                    group_size: int | None, cu_groups: torch.Tensor | None) -> torch.Tensor:
    """d loss / d rewards from the gradient the forward kernel saved (that of the reduced loss,
    or of sum_g loss_g for reduction "none") and the incoming grad_output (a scalar, or (G,)
    per group for "none")."""
    if reduction != "none":
        return grad * grad_output
    if cu_groups is None:
        return (grad.view(-1, group_size) * grad_output[:, None]).view(-1)
    sizes = cu_groups[1:] - cu_groups[:-1]
    return grad * grad_output.repeat_interleave(sizes, output_size=grad.numel())


def grebt_loss_over(op: Callable, name: str, doc: str) -> Callable:
    """The backend function `name` (registered with dispatch) over the custom op `op` of
    custom_ops.define_grebt_op; `doc` is its docstring. The op writes the gradient only
    when rewards will be differentiated."""

    def grebt_loss(rewards, group_size=None, cu_groups=None, alpha=0.3, eps=1e-6, reduction="mean",
                   max_group=None):
        write_grad = rewards.requires_grad and torch.is_grad_enabled()
        return op(rewards, group_size, cu_groups, max_group, float(alpha), float(eps), reduction,
                  write_grad)[0]

    grebt_loss.__name__ = grebt_loss.__qualname__ = name
    grebt_loss.__doc__ = doc
    return grebt_loss
