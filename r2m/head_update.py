"""The R2M update (docs/design.md §1.4 step 6): one GREBT step on the head, exact under data parallelism.

With several processes each one holds a slice of the batch, and a group of K completions may
straddle two of them. Each process recomputes the rewards of its own rows with gradient, gathers
everyone's rewards (values only) into the whole batch, puts its own slice back with its graph,
and takes GREBT over the whole batch: its backward gives d loss / d head through its own rows
only, and the sum of those over the processes (an all-reduce) is the gradient of the whole
batch's loss. Every process then takes the same optimizer step from the same gradient, so the
heads, broadcast from process 0 at the start, stay bitwise equal.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import R2MConfig
from .loss import GREBTLoss
from .ablations import noise_like
from .reward_model import R2MRewardModel
from .tokens import attended_positions


class NonFiniteError(RuntimeError):
    """The head's rewards, loss, gradient or weights turned inf or NaN: training stops there,
    before they reach the policy's advantages or a checkpoint (a step skipped instead would
    hide a learning rate or an input that keeps producing them)."""


def non_finite_part(loss: torch.Tensor, module: nn.Module) -> str | None:
    """Which of the loss, the gradient or the weights of `module` holds an inf or NaN, or None."""
    if not torch.isfinite(loss).all():
        return "GREBT loss"
    parameters = list(module.parameters())
    if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in parameters):
        return "gradient"
    if any(not torch.isfinite(p).all() for p in parameters):
        return "weights"
    return None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Every process gets process `src`'s parameters and buffers (no-op with one process)."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def gather_keeping_local_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' 1-D `local` tensors concatenated in rank order; this process's slice is
    `local` itself (with its graph), the others are values. Every process must pass the same
    number of rows."""
    world = _world_size()
    if world == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=local.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every process must hold the same number of rows; got {[int(s) for s in sizes]}")
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def all_reduce_gradients(module: nn.Module) -> None:
    """Sum every parameter's gradient over the processes (no-op with one process)."""
    if _world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


class HeadUpdate:
    """The head's optimizer and its GREBT step, as the mode asks: `static` never runs the head;
    `r2m-frozen` evaluates the loss without a step; `noise` feeds the head noise with the hidden
    states' per-feature statistics; `bt-only` / `gre-only` fix the mix alpha; `iterative-head`
    (the paper's Iterative RMHead baseline) rewards with the head's score phi on the RTE alone
    and trains phi only. The head's own settings (backend, omega_floor) are read from the head.
    """

    def __init__(self, reward_model: R2MRewardModel, config: R2MConfig):
        self.reward_model, self.config = reward_model, config
        self.head = reward_model.head
        loss_backend = "auto" if self.head.backend == "eager" else self.head.backend  # GREBT follows the head
        self.loss = GREBTLoss(alpha=config.alpha, backend=loss_backend)
        trained = self.head.score if config.mode == "iterative-head" else self.head
        self.optimizer = torch.optim.AdamW(trained.parameters(), lr=config.head_learning_rate)

    def head_mask(self, attention_mask: torch.Tensor, completion_start: int) -> torch.Tensor:
        """The mask the head attends with under this run's head_attends (r2m.tokens.attended_positions)."""
        return attended_positions(attention_mask, completion_start, self.config.head_attends)

    def head_input(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return noise_like(hidden, attention_mask) if self.config.mode == "noise" else hidden

    def _head_reward(self, rte, hidden, attention_mask, omega: float) -> torch.Tensor:
        if self.config.mode == "iterative-head":
            return self.head.score(rte.to(self.head.score.weight.dtype)).squeeze(-1).float()
        return self.reward_model(rte, self.head_input(hidden, attention_mask), mask=attention_mask, omega=omega)

    @torch.no_grad()
    def rewards(self, rte, hidden, attention_mask, omega: float) -> torch.Tensor:
        """The rewards the policy is trained on (B,) fp32: the R2M reward at `omega`, the RM's
        own in static mode, phi(rte) in iterative-head mode (hidden may be None in both)."""
        if not self.config.uses_head:
            return self.reward_model.static_reward(rte)
        return self._head_reward(rte, hidden, attention_mask, omega)

    @torch.no_grad()
    def reward_terms(self, rte, hidden, attention_mask, omega: float) -> tuple[torch.Tensor, torch.Tensor]:
        """R2MHead.reward_terms on the head's input in this mode: the head term and the RM term
        of the reward, each (B,) fp32. Only for modes that read hidden states."""
        if not self.config.reads_hidden_states:
            raise ValueError(f"mode {self.config.mode!r} has no head term")
        return self.head.reward_terms(rte, self.head_input(hidden, attention_mask), mask=attention_mask, omega=omega)

    def step(self, rte, hidden, attention_mask, omega: float, group_size: int) -> dict:
        """GREBT on this process's rows (B_local, ...) within the whole batch's groups of
        `group_size`; a step on the head when the mode trains it (not in static mode, which has
        no head to update). Every process must call it together. Returns {"loss", "ms"};
        NonFiniteError when the loss, the gradient or the weights are not finite."""
        if not self.config.uses_head:
            raise ValueError("mode 'static' has no head to update")
        device = rte.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.head.train(self.config.trains_head)
        with torch.set_grad_enabled(self.config.trains_head):
            local = self._head_reward(rte, hidden, attention_mask, omega)
            loss = self.loss(gather_keeping_local_grad(local), group_size)
        if self.config.trains_head:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(self.head)
            self.optimizer.step()
        # Every process sees the same loss, reduced gradient and weights: all stop together.
        bad = non_finite_part(loss.detach(), self.head)
        if bad is not None:
            raise NonFiniteError(f"the head's {bad} is not finite after its update (head_learning_rate "
                                 f"{self.config.head_learning_rate:g}); the run stops before it reaches a reward "
                                 "or a checkpoint")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"loss": loss.item(), "ms": (time.perf_counter() - start) * 1e3}
