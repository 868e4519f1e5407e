"""Host-side steps shared by the compiled backends (triton, cuda), so that both do them alike:
the torch.library custom ops (with autograd and fake implementations, so torch.compile keeps
each kernel as one opaque node and autograd works through it), the flash-decoding split of
the attention pool and its combine, and GREBT's backward from the gradient its forward
kernel saved."""

from __future__ import annotations

from typing import Callable

import torch

from .reference import accumulation_dtype

# Each flash-decoding split gets at least this many positions, so splitting never makes the
# per-program work smaller than the combine it costs.
MIN_ROWS_PER_SPLIT = 64


def sequences(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    """(B, a typical sequence length for choosing splits): S of padded (B, S, D_p) hidden,
    ceil(N / B) of packed (N, D_p) hidden."""
    if cu_seqlens is None:
        return hidden.shape[0], hidden.shape[1]
    batch = cu_seqlens.shape[0] - 1
    return batch, -(-hidden.shape[0] // batch)


def num_splits(programs: int, seq_len: int, device: torch.device) -> int:
    """Flash-decoding splits of each sequence: enough programs for about two waves of the
    GPU, never chunks shorter than MIN_ROWS_PER_SPLIT positions. Off the GPU (the Triton
    interpreter) a pretend 2-SM device, so that tests run the split path at small batches."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    wanted = -(-2 * sms // programs)
    return max(1, min(wanted, -(-seq_len // MIN_ROWS_PER_SPLIT)))


def combine_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """Flash-decoding combine of per-split results: out (n_split, B, n_h, D) softmax-normalised
    partial outputs and lse (n_split, B, n_h) their log-sum-exps, in the accumulation dtype.
    Each split is weighted by its share of the total softmax mass (a split with no valid
    position has lse = -inf and weight 0). Returns (pooled (B, n_h, D) in `dtype`, lse (B, n_h))."""
    total = torch.logsumexp(lse, dim=0)
    pooled = (torch.exp(lse - total)[..., None] * out).sum(dim=0)
    return pooled.to(dtype), total


def grebt_grad_from_saved(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str,
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


def grebt_groups(rewards: torch.Tensor, group_size: int | None, cu_groups: torch.Tensor | None):
    """(number of groups, largest group size). Ragged groups cost one host sync."""
    if cu_groups is None:
        return rewards.shape[0] // group_size, group_size
    return cu_groups.numel() - 1, int((cu_groups[1:] - cu_groups[:-1]).max())


def define_attention_pool_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """The custom op `r2m::{name}` (and `r2m::{name}_backward`) over a backend's host code.

    forward(hidden, q, scale, mask, cu_seqlens) -> (pooled (B, n_h, D_p) in hidden.dtype,
        lse (B, n_h) log-sum-exp of the scores in the accumulation dtype);
    backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden) ->
        (dq in q.dtype, dhidden in hidden's dtype and shape, or an empty tensor).
    Returns the forward op; differentiable in hidden and q.
    """

    @torch.library.custom_op(f"r2m::{name}", mutates_args=())
    def pool(hidden: torch.Tensor, q: torch.Tensor, scale: float, mask: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(hidden, q, scale, mask, cu_seqlens)

    @pool.register_fake
    def _(hidden, q, scale, mask, cu_seqlens):
        batch = hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return (hidden.new_empty((batch, q.shape[1], hidden.shape[-1])),
                hidden.new_empty((batch, q.shape[1]), dtype=accumulation_dtype(hidden.dtype)))

    @torch.library.custom_op(f"r2m::{name}_backward", mutates_args=())
    def pool_backward(grad: torch.Tensor, hidden: torch.Tensor, q: torch.Tensor,
                      pooled: torch.Tensor, lse: torch.Tensor, scale: float,
                      mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                      need_dhidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return backward(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden)

    @pool_backward.register_fake
    def _(grad, hidden, q, pooled, lse, scale, mask, cu_seqlens, need_dhidden):
        dhidden = hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0)
        return q.new_empty(q.shape), dhidden

    def setup_context(ctx, inputs, output):
        hidden, q, scale, mask, cu_seqlens = inputs
        pooled, lse = output
        ctx.save_for_backward(hidden, q, pooled, lse, mask, cu_seqlens)
        ctx.scale = scale

    def differentiate(ctx, grad_pooled, grad_lse):
        # lse is an internal output: nothing differentiates through it.
        hidden, q, pooled, lse, mask, cu_seqlens = ctx.saved_tensors
        need_dhidden = ctx.needs_input_grad[0]
        dq, dhidden = pool_backward(grad_pooled, hidden, q, pooled, lse, ctx.scale, mask,
                                    cu_seqlens, need_dhidden)
        return (dhidden if need_dhidden else None), dq, None, None, None

    pool.register_autograd(differentiate, setup_context=setup_context)
    return pool


def define_grebt_op(name: str, forward: Callable) -> Callable:
    """The custom op `r2m::{name}` over a backend's host code, whose kernel writes the loss
    and its gradient in one launch.

    forward(rewards, group_size, cu_groups, alpha, eps, reduction, write_grad) -> (loss: a
        scalar, or (G,) for "none"; d loss / d rewards (B,), empty unless write_grad), both
        in the accumulation dtype (for "none" the gradient is that of sum_g loss_g).
    Backward only scales the saved gradient by grad_output. Returns the op.
    """

    @torch.library.custom_op(f"r2m::{name}", mutates_args=())
    def grebt(rewards: torch.Tensor, group_size: int | None, cu_groups: torch.Tensor | None,
              alpha: float, eps: float, reduction: str,
              write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(rewards, group_size, cu_groups, alpha, eps, reduction, write_grad)

    @grebt.register_fake
    def _(rewards, group_size, cu_groups, alpha, eps, reduction, write_grad):
        acc = accumulation_dtype(rewards.dtype)
        if reduction != "none":
            loss_shape = ()
        elif cu_groups is None:
            loss_shape = (rewards.shape[0] // group_size,)
        else:
            loss_shape = (cu_groups.shape[0] - 1,)
        return (rewards.new_empty(loss_shape, dtype=acc),
                rewards.new_empty(rewards.shape[0] if write_grad else 0, dtype=acc))

    def setup_context(ctx, inputs, output):
        rewards, group_size, cu_groups, _, _, reduction, _ = inputs
        ctx.save_for_backward(output[1], cu_groups)
        ctx.group_size, ctx.reduction, ctx.rewards_dtype = group_size, reduction, rewards.dtype

    def differentiate(ctx, grad_output, grad_of_grad):
        grad, cu_groups = ctx.saved_tensors
        grad_rewards = grebt_grad_from_saved(grad, grad_output, ctx.reduction, ctx.group_size,
                                             cu_groups)
        return grad_rewards.to(ctx.rewards_dtype), None, None, None, None, None, None

    grebt.register_autograd(differentiate, setup_context=setup_context)
    return grebt
