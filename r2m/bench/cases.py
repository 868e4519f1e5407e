"""What the benchmark times: one Case per (op, size, backend).

Ops (OPS below): `pool` is r2m_kernels.attention_pool alone; `head` is R2MHead's forward;
`grebt` is the GREBT loss over B/K groups of K; `update` is the whole R2M update step (head
forward on all B responses with the RTE cached, GREBT, backward, AdamW); `rm-update` puts a
full update of a transformer reward model (rm_update.py) beside that step.

The baseline row of each op is what the speedups divide: `eager` is the paper's formula as
written (K and V materialised) for pool/head/update and the torch reference called directly
for grebt; `rm-full` for rm-update. The other rows are every backend in r2m_kernels.BACKENDS
that can run on the device: registered for the op (pool, grebt), or accepted by R2MHead
(head, update, rm-update), so new backends appear by themselves.

Inputs: hidden (B, S, D_p) and rte (B, D_rm) random in the benchmark dtype, full length (no
padding, so every position is read); head parameters fp32; rewards fp32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from r2m import GREBTLoss, R2MHead
from r2m_kernels import BACKENDS, BackendUnavailableError, attention_pool, grebt_loss, why_unavailable
from r2m_kernels.reference import grebt_loss_torch
from r2m_kernels.triton.attention_pool_many_heads import VARIANTS as POOL_VARIANTS
from r2m_kernels.triton.attention_pool_many_heads import forced_variant

from .sizes import Size


@dataclass(frozen=True)
class OpSpec:
    name: str
    title: str
    baseline: str
    # Where the kernel rows come from: an r2m_kernels op's registered backends, or "head":
    # R2MHead's, which must run every op the head calls (probed with a tiny forward).
    kernels: str
    extra_backends: tuple[str, ...]  # rows beside the kernel backends, baseline first
    floor_passes: tuple[int, int, int] | None  # passes over hidden: (fwd, bwd, fwd+bwd); None: no floor
    split: bool = True  # forward and backward timed apart as well as together
    combined: str = "fwd+bwd"  # what the forward+backward column holds


OPS: dict[str, OpSpec] = {o.name: o for o in (
    OpSpec("pool", "attention pool over hidden (eager: K/V projections and attention, the paper's formula)",
           "eager", "attention_pool", ("eager",), (1, 1, 2)),
    OpSpec("head", "R2MHead forward, backward into its parameters (hidden frozen)",
           "eager", "head", ("eager", "compile"), (1, 1, 2)),
    OpSpec("grebt", "GREBT loss over B/K groups of K rewards (eager: the torch reference called directly)",
           "eager", "grebt_loss", ("eager", "compile"), None),
    OpSpec("update", "R2M update step: head on all B responses (RTE cached), GREBT, backward, AdamW; "
                     "forward+backward column = the whole step",
           "eager", "head", ("eager",), (1, 1, 2), combined="whole step"),
    OpSpec("rm-update", "full reward-model update (Bradley-Terry on the B/K (max, min) pairs) beside the "
                        "R2M update step on the same batch; one step each, wall-clock timer",
           "rm-full", "head", ("rm-full",), None, split=False, combined="whole step"),
)}

# Backends that can run on a device but must not be timed there, and why.
NOT_TIMED = {
    "cpu": {
        "triton": "on the CPU Triton runs only in its interpreter, which is for tests, not timing",
        "compile": "torch.compile rows are timed on the GPU only (compiling on the CPU costs more "
                   "than the whole CPU smoke run)",
    },
}


@dataclass
class Case:
    """One timed configuration.

    step(): one forward+backward (plus the optimizer step where there is one).
    forward(): the forward alone, returning the tensor that backward differentiates with
    grad_output (None for a scalar). leaves: tensors whose .grad is cleared before each call.
    hidden_bytes: bytes of hidden read by one pass (None: the op has no floor).
    scope(): the context every call runs in (a forced variant of the Triton pool).
    """

    step: Callable[[], object]
    leaves: Sequence[torch.Tensor] = ()
    forward: Callable[[], torch.Tensor] | None = None
    grad_output: torch.Tensor | None = None
    hidden_bytes: int | None = None
    note: str = ""
    scope: Callable[[], ContextManager] = contextlib.nullcontext

    def backward(self, out: torch.Tensor) -> None:
        torch.autograd.backward(out, self.grad_output, retain_graph=True)


def _head_why_not(backend: str, device: torch.device) -> str | None:
    """None when R2MHead(backend=...) runs on `device`: a forward on a few positions, so that
    every op the head calls is asked, whichever they are."""
    head = R2MHead(16, 32, attn_dim=16, backend=backend).to(device)
    try:
        head(torch.randn(2, 16, device=device), torch.randn(2, 16, 32, device=device), omega=0.5)
    except BackendUnavailableError as exc:
        return str(exc)
    except Exception:  # it can run but fails: its timed case will fail too, and report why
        return None
    return None


def kernel_backends(op: OpSpec, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The kernel backends (r2m_kernels.BACKENDS) to time for `op` on `device`, and {backend:
    why not} for the others."""
    run, skipped = [], {}
    for name in BACKENDS:
        reason = NOT_TIMED.get(device.type, {}).get(name)
        if reason is None and op.kernels == "head":
            reason = _head_why_not(name, device)
        elif reason is None:
            reason = why_unavailable(name, op.kernels, device)
        if reason is None:
            run.append(name)
        else:
            skipped[name] = reason
    return run, skipped


def backends_for(op: OpSpec, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Row names of `op` on `device` (baseline first) and {name: why it is not timed}."""
    kernels, skipped = kernel_backends(op, device)
    rows = []
    for name in op.extra_backends:
        if name in NOT_TIMED.get(device.type, {}):
            skipped[name] = NOT_TIMED[device.type][name]
        else:
            rows.append(name)
    if op.name == "rm-update":
        update_rows, _ = backends_for(OPS["update"], device)
        return rows + [f"r2m-{b}" for b in update_rows], skipped
    return rows + kernels, skipped


def with_pool_variants(names: list[str]) -> list[str]:
    """`names` with the triton row split into one row per variant of the Triton attention pool
    ("triton:per-head", "triton:many-heads"), each timed under forced_variant."""
    return [f"{n}:{v}" if n == "triton" else n for n in names for v in (POOL_VARIANTS if n == "triton" else ("",))]


def _hidden(size: Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(size.batch, size.seq_len, size.policy_dim, device=device, dtype=dtype)


def _differentiable(forward, leaves, grad_output, hidden_bytes, note="", optimizer=None) -> Case:
    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(forward(), grad_output)
        if optimizer is not None:
            optimizer.step()

    return Case(step, list(leaves), forward, grad_output, hidden_bytes, note)


def _new_head(size: Size, backend: str, device: torch.device) -> R2MHead:
    head_backend = "eager" if backend == "compile" else backend
    return R2MHead(size.rm_dim, size.policy_dim, size.attn_dim, size.num_heads, backend=head_backend).to(device)


def pool_case(size: Size, backend: str, dtype: torch.dtype, device: torch.device) -> Case:
    """attention_pool(hidden, q~ (B, n_h, D_p) fp32) -> (B, n_h, D_p), gradient into q~ only
    (hidden is frozen in R2M). eager: the paper's K/V attention from q (B, n_h, d_h) through
    R2MHead's eager path, gradients into q, W_k and W_v. "triton:VARIANT": the triton backend
    with that variant forced (with_pool_variants)."""
    backend, _, variant = backend.partition(":")
    hidden = _hidden(size, dtype, device)
    nbytes = hidden.numel() * hidden.element_size()
    if backend == "eager":
        head = _new_head(size, "eager", device)
        q = torch.randn(size.batch, size.num_heads, head.head_dim, device=device, requires_grad=True)
        forward = lambda: head._attend_eager(q, hidden, None, None)  # noqa: E731
        leaves = [q, head.k_proj.weight, head.v_proj.weight]
        out_shape = (size.batch, size.num_heads, head.head_dim)
    else:
        q = (torch.randn(size.batch, size.num_heads, size.policy_dim, device=device)
             / math.sqrt(size.policy_dim)).requires_grad_()
        scale = 1.0 / math.sqrt(size.attn_dim // size.num_heads)
        forward = lambda: attention_pool(hidden, q, scale, backend=backend)  # noqa: E731
        leaves, out_shape = [q], (size.batch, size.num_heads, size.policy_dim)
    # Both paths return hidden's dtype.
    case = _differentiable(forward, leaves, torch.randn(out_shape, device=device, dtype=dtype), nbytes)
    if variant:
        case.scope, case.note = (lambda: forced_variant(variant)), f"{variant} variant forced"
    return case


def head_case(size: Size, backend: str, dtype: torch.dtype, device: torch.device) -> Case:
    """R2MHead(rte, hidden) -> rewards (B,) fp32, gradients into every head parameter."""
    head = _new_head(size, backend, device)
    rte = torch.randn(size.batch, size.rm_dim, device=device, dtype=dtype)
    hidden = _hidden(size, dtype, device)
    module = torch.compile(head, dynamic=False) if backend == "compile" else head
    note = "torch.compile of the eager head" if backend == "compile" else ""
    grad = torch.randn(size.batch, device=device)
    return _differentiable(lambda: module(rte, hidden), list(head.parameters()), grad,
                           hidden.numel() * hidden.element_size(), note)


def grebt_case(size: Size, backend: str, dtype: torch.dtype, device: torch.device) -> Case:
    """GREBT loss of rewards (B,) fp32 in B/K groups of K -> scalar, gradient into the rewards.
    `dtype` is unused: rewards are fp32 whatever the hidden states are."""
    rewards = torch.randn(size.batch, device=device, requires_grad=True)
    k = size.group
    if backend == "eager":
        forward = lambda: grebt_loss_torch(rewards, group_size=k)  # noqa: E731
    elif backend == "compile":
        compiled = torch.compile(grebt_loss_torch, dynamic=False)
        forward = lambda: compiled(rewards, group_size=k)  # noqa: E731
    else:
        forward = lambda: grebt_loss(rewards, k, backend=backend)  # noqa: E731
    note = {"compile": "torch.compile of the torch reference"}.get(backend, "")
    return _differentiable(forward, [rewards], None, None, f"{size.prompts} groups of {k}; {note}".rstrip("; "))


def update_case(size: Size, backend: str, dtype: torch.dtype, device: torch.device) -> Case:
    """The R2M update step with `backend` for the head; GREBT runs on the same backend where
    it has one, else on torch."""
    head = _new_head(size, backend, device)
    usable = backend in BACKENDS and why_unavailable(backend, "grebt_loss", device) is None
    loss_backend = backend if usable else "torch"
    loss_fn = GREBTLoss(backend=loss_backend)
    rte = torch.randn(size.batch, size.rm_dim, device=device, dtype=dtype)
    hidden = _hidden(size, dtype, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-6)
    forward = lambda: loss_fn(head(rte, hidden), size.group)  # noqa: E731
    return _differentiable(forward, list(head.parameters()), None, hidden.numel() * hidden.element_size(),
                           f"GREBT on {loss_backend}", optimizer)


BUILDERS = {"pool": pool_case, "head": head_case, "grebt": grebt_case, "update": update_case}
