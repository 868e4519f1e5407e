"""The backends every op test runs on.

Where CUDA is present the three backends run on the GPU (the cuda backend through the real
extension r2m_kernels._cuda). Without it: torch; triton in Triton's interpreter (the
`interpreter` mark); and cuda through tests/support/cuda_contract.py, a plain-PyTorch model of the
launchers standing in for the extension, so the backend's host code, splits and autograd run
for real on CPU tensors (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from r2m_kernels import dispatch
from r2m_kernels.cuda import attention_pool as cuda_pool
from r2m_kernels.cuda import grebt as cuda_grebt

from tests.support.cuda_contract import FakeExtension

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
ALL = ("torch", "triton", "cuda")
COMPILED = ("triton", "cuda")


def params(names):
    """pytest params of backend names. Off the GPU triton carries the `interpreter` mark; on
    it cuda carries the `gpu` mark (the real extension: `pytest -m gpu` runs those)."""
    marks = {"triton": () if HAS_CUDA else pytest.mark.interpreter,
             "cuda": pytest.mark.gpu if HAS_CUDA else ()}
    return [pytest.param(name, marks=marks.get(name, ()), id=name) for name in names]


def install_cuda_contract(monkeypatch) -> FakeExtension:
    """Make the cuda backend run CPU tensors through the contract model; returns the model."""
    fake = FakeExtension()
    monkeypatch.setattr(cuda_pool, "module", lambda: fake)
    monkeypatch.setattr(cuda_grebt, "module", lambda: fake)
    # The cuda backend's device probe refuses CPU tensors, and dispatch has no public way to
    # replace a registered probe: swap the device probe of each cuda registry entry for one
    # that also accepts the CPU (its input probe, which knows the kernels' limits, stays).
    for op in dispatch.OPS:
        entry = dispatch._REGISTRY[(op, "cuda")]
        probe = entry.why_not_device
        monkeypatch.setitem(dispatch._REGISTRY, (op, "cuda"), dataclasses.replace(
            entry, why_not_device=lambda device, probe=probe: None if device.type == "cpu" else probe(device)))
    return fake


def use(name: str, monkeypatch) -> str:
    """Prepare backend `name` for a test on DEVICE and return it."""
    if name == "cuda" and not HAS_CUDA:
        install_cuda_contract(monkeypatch)
    return name


def has_second_derivative(op: str, backend: str) -> bool:
    """docs/design.md §7: the torch backend is differentiable to any order; the compiled ops
    raise on a double backward. cuda's score_mix is the torch implementation (no kernel)."""
    return backend == "torch" or (backend == "cuda" and op == "score_mix")


def check_second_derivative(op: str, backend: str, fn, inputs) -> None:
    """docs/design.md §7: a double backward through `op` is right (the torch backend: checked
    by gradgradcheck in float64) or a RuntimeError that says so (the compiled ops); never the
    silent zero of a first derivative treated as a constant.

    fn(*inputs) -> a tensor; inputs: float64 tensors, the differentiable ones requiring grad
    (cast to float32 for the compiled ops: the cuda kernels take no float64)."""
    if has_second_derivative(op, backend):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
        return
    inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    wrt = [x for x in inputs if x.requires_grad]
    out = fn(*inputs)
    grad_out = torch.randn_like(out).requires_grad_(True)
    plain = torch.autograd.grad(out, wrt, grad_out.detach(), retain_graph=True)
    first = torch.autograd.grad(out, wrt, grad_out, create_graph=True)
    for a, b in zip(first, plain):  # building the graph changes no first derivative
        assert torch.equal(a, b)
    directions = sum((g * torch.randn_like(g)).sum() for g in first)
    for second_wrt in (wrt, [grad_out]):  # through the inputs, and through grad_output
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(directions, second_wrt, retain_graph=True)
