"""The torch.library custom ops over the compiled backends' host code (triton, cuda).

Every compiled op is defined here the same way: a forward custom op, a backward custom op, a
fake implementation of each (so torch.compile keeps each kernel as one opaque node and
traces through it without a graph break), and autograd registered between them. A backend
supplies only its host functions.

Second derivatives: none of these ops implements one. Under create_graph=True the first
derivatives are tied to the op's inputs through a node whose derivative raises, so a
double backward fails with a message instead of silently treating the first derivative as
a constant (which would make a Hessian zero).
"""

from __future__ import annotations

from typing import Callable

import torch

from .grebt_host import grad_from_saved
from .precision import accumulation_dtype


class _NoSecondDerivative(torch.autograd.Function):
    """A scalar zero that depends on `inputs`; differentiating it raises."""

    @staticmethod
    def forward(ctx, op_name, *inputs):
        ctx.op_name = op_name
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.op_name} has no second derivative (double backward through a "
                           f"compiled r2m op); use backend='torch' for higher-order gradients")


def _first_derivatives_only(op_name: str, grads: tuple, inputs: tuple) -> tuple:
    """`grads` unchanged, except under create_graph (grad mode on during backward), where each
    is tied to the inputs that require grad through _NoSecondDerivative."""
    if not torch.is_grad_enabled():
        return grads
    tracked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tracked:
        return grads
    zero = _NoSecondDerivative.apply(op_name, *tracked)
    return tuple(None if g is None else g + zero.to(g.dtype) for g in grads)


def define_attention_pool_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """The custom op `r2m::{name}` (and `r2m::{name}_backward`) over a backend's host code.

    forward(hidden, q, scale, mask, cu_seqlens) -> (pooled (B, n_h, D_p) and lse (B, n_h), the
        log-sum-exp of the scores, both in the accumulation dtype: the backward's
        delta = grad . pooled must not see pooled rounded to a 16-bit hidden's dtype, so the
        op returns it unrounded and the backend's wrapper casts what the user gets);
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
        acc = accumulation_dtype(hidden.dtype)
        return (hidden.new_empty((batch, q.shape[1], hidden.shape[-1]), dtype=acc),
                hidden.new_empty((batch, q.shape[1]), dtype=acc))

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
        with torch.no_grad():
            dq, dhidden = pool_backward(grad_pooled, hidden, q, pooled, lse, ctx.scale, mask,
                                        cu_seqlens, need_dhidden)
        dhidden, dq = _first_derivatives_only(f"r2m::{name}", (dhidden if need_dhidden else None, dq),
                                              (hidden, q, grad_pooled))
        return dhidden, dq, None, None, None

    pool.register_autograd(differentiate, setup_context=setup_context)
    return pool


def define_grebt_op(name: str, forward: Callable) -> Callable:
    """The custom op `r2m::{name}` over a backend's host code, whose kernel writes the loss
    and its gradient in one launch.

    forward(rewards, group_size, cu_groups, max_group, alpha, eps, reduction, write_grad) ->
        (loss: a scalar, or (G,) for "none"; d loss / d rewards (B,), empty unless
        write_grad), both in the accumulation dtype (for "none" the gradient is that of
        sum_g loss_g). max_group is the largest group size when known (or None).
    Backward only scales the saved gradient by grad_output. Returns the op.
    """

    @torch.library.custom_op(f"r2m::{name}", mutates_args=())
    def grebt(rewards: torch.Tensor, group_size: int | None, cu_groups: torch.Tensor | None,
              max_group: int | None, alpha: float, eps: float, reduction: str,
              write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(rewards, group_size, cu_groups, max_group, alpha, eps, reduction, write_grad)

    @grebt.register_fake
    def _(rewards, group_size, cu_groups, max_group, alpha, eps, reduction, write_grad):
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
        rewards, group_size, cu_groups, _, _, _, reduction, _ = inputs
        ctx.save_for_backward(rewards, output[1], cu_groups)
        ctx.group_size, ctx.reduction = group_size, reduction

    def differentiate(ctx, grad_output, grad_of_grad):
        rewards, grad, cu_groups = ctx.saved_tensors
        with torch.no_grad():
            grad_rewards = grad_from_saved(grad, grad_output, ctx.reduction, ctx.group_size,
                                           cu_groups).to(rewards.dtype)
        grad_rewards, = _first_derivatives_only(f"r2m::{name}", (grad_rewards,), (rewards, grad_output))
        return grad_rewards, None, None, None, None, None, None, None

    grebt.register_autograd(differentiate, setup_context=setup_context)
    return grebt


def define_score_mix_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """The custom op `r2m::{name}` (and `r2m::{name}_backward`) over a backend's host code.

    forward(attended, rte, out_weight, score_weight, score_bias, omega) -> (rewards (B,),
        u = W_o^T w (d,)), both in the accumulation dtype; u is kept for the backward;
    backward(grad, attended, rte, out_weight, score_weight, u, omega, need_attended,
        need_rte, need_out_weight, need_score_weight) -> (d attended, d rte, d W_o, d w), each
        in its input's dtype, an empty tensor where not needed.
    Returns the forward op; differentiable in every tensor (the bias by grad.sum()).
    """

    @torch.library.custom_op(f"r2m::{name}", mutates_args=())
    def score_mix(attended: torch.Tensor, rte: torch.Tensor, out_weight: torch.Tensor,
                  score_weight: torch.Tensor, score_bias: torch.Tensor | None,
                  omega: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(attended, rte, out_weight, score_weight, score_bias, omega)

    @score_mix.register_fake
    def _(attended, rte, out_weight, score_weight, score_bias, omega):
        acc = torch.promote_types(score_weight.dtype, torch.float32)
        return (attended.new_empty(attended.shape[0], dtype=acc),
                attended.new_empty(attended.shape[1], dtype=acc))

    @torch.library.custom_op(f"r2m::{name}_backward", mutates_args=())
    def score_mix_backward(grad: torch.Tensor, attended: torch.Tensor, rte: torch.Tensor,
                           out_weight: torch.Tensor, score_weight: torch.Tensor, u: torch.Tensor,
                           omega: float, need_attended: bool, need_rte: bool, need_out_weight: bool,
                           need_score_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        return backward(grad, attended, rte, out_weight, score_weight, u, omega, need_attended,
                        need_rte, need_out_weight, need_score_weight)

    @score_mix_backward.register_fake
    def _(grad, attended, rte, out_weight, score_weight, u, omega, need_attended, need_rte,
          need_out_weight, need_score_weight):
        def like(t, needed):
            return t.new_empty(t.shape if needed else (0,))
        return (like(attended, need_attended), like(rte, need_rte), like(out_weight, need_out_weight),
                like(score_weight, need_score_weight))

    def setup_context(ctx, inputs, output):
        attended, rte, out_weight, score_weight, score_bias, omega = inputs
        ctx.save_for_backward(attended, rte, out_weight, score_weight, score_bias, output[1])
        ctx.omega = omega

    def differentiate(ctx, grad, grad_u):
        # u is an internal output: nothing differentiates through it.
        attended, rte, out_weight, score_weight, score_bias, u = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        with torch.no_grad():
            grads = score_mix_backward(grad.contiguous(), attended, rte, out_weight, score_weight,
                                       u, ctx.omega, *needs[:4])
            d_bias = grad.sum().reshape(1).to(score_bias.dtype) if needs[4] else None
        grads = tuple(g if need else None for g, need in zip(grads + (d_bias,), needs))
        grads = _first_derivatives_only(f"r2m::{name}", grads,
                                        (attended, rte, out_weight, score_weight, score_bias, grad))
        return (*grads, None)

    score_mix.register_autograd(differentiate, setup_context=setup_context)
    return score_mix
