"""Adversarial inputs for every public function (docs/design.md §3, §8): dtypes, strides,
devices (meta tensors stand in for a second device), zero sizes, extreme magnitudes, masks,
offsets and the finite check. One table per function; a row builds its inputs and names the
outcome it expects:

- Same(rtol): the result, and the gradient of every input built with `leaf`, match the torch
  backend in float64 on the same (rounded) values, up to rtol and one rounding to their dtype
  relative to the largest value; non-finite exactly where float64 is;
- Raises(exc, word): that exception, its message naming the argument;
- Shape(shape): a result of that shape (meta tensors have no values to compare).

`refused` maps a backend to a word of the BackendUnavailableError it raises instead. The op
tables run on every backend (tests/support/backends.py); R2MHead's on eager, torch and cuda.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn

import r2m_kernels
from r2m import GREBTLoss, R2MConfig, R2MHead, omega
from r2m.config import HEAD_LEARNING_RATE_MAX
from r2m_kernels import BackendUnavailableError, attention_pool, finite_checks, grebt_loss, score_mix

from tests.support.backends import DEVICE, HAS_CUDA, params, use

# Rows feed NaN, inf and overflows on purpose: the interpreter's numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero|All-NaN):RuntimeWarning")

F16, BF16, F32, F64, I32 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32
NAN, INF = float("nan"), float("inf")


class Same(NamedTuple):
    rtol: float = 1e-5
    atol: float = 0.0
    poisoned: tuple = ()   # leading indices (sequences) that must be non-finite, not compared
    grads: bool = True
    grad_rtol: float | None = None  # the gradients' rtol, where it differs from the result's


class Raises(NamedTuple):
    exc: type
    word: str


class Shape(NamedTuple):
    shape: tuple


class Row(NamedTuple):
    id: str
    build: Callable  # Inputs -> keyword arguments of the call
    expect: object
    refused: dict = {}
    checks: bool = False  # under finite_checks()
    per_backend: dict = {}  # backend -> the Same it is held to instead of expect


class Inputs:
    """What a row builds its arguments with: leaf(x), a differentiated input (float64 in the
    reference run); on(x), any other tensor, moved to the test device."""

    def __init__(self, float64: bool):
        self.float64, self.leaves = float64, []

    def leaf(self, x):
        x = x.to(DEVICE, F64 if self.float64 else x.dtype).requires_grad_(True)
        self.leaves.append(x)
        return x

    def on(self, x):
        return x.to(DEVICE)


def randn(*shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, dtype=F64) * scale).to(dtype)


def build(row, float64):
    """(the Inputs, the row's keyword arguments), CPU tensors moved to the test device (meta
    tensors stay: they stand in for another device)."""
    torch.manual_seed(7)  # the same draws in the row's run and in its reference run
    inputs = Inputs(float64)
    args = row.build(inputs)
    return inputs, {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
                    for k, v in args.items()}


def assert_same(name, got, want, expect):
    """got against want (float64) under expect's tolerance, plus one rounding to got's dtype."""
    info = torch.finfo(got.dtype)
    rounding, spacing = info.eps, info.tiny * info.eps  # relative, and among the subnormals
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    keep = torch.ones(got.shape[:1], dtype=torch.bool)
    if expect.poisoned and got.dim():
        keep[list(expect.poisoned)] = False
        if name == "result":
            assert not torch.isfinite(got[~keep]).all(), "the poisoned entries should be non-finite"
    got, want = got[keep], want[keep]
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: non-finite where float64 is not"
    finite = torch.isfinite(want)
    if finite.any():
        err = (got[finite] - want[finite]).abs().max().item()
        bound = (expect.rtol + rounding) * want[finite].abs().max().item() + spacing + expect.atol
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


def check(call, row, backend, request):
    """Run row through call(backend, **arguments) and check its expected outcome."""
    expect = row.per_backend.get(backend, row.expect)
    inputs, args = build(row, False)
    with finite_checks() if row.checks else contextlib.nullcontext():
        if backend in row.refused:
            with pytest.raises(BackendUnavailableError, match=row.refused[backend]):
                call(backend, **args)
            return
        if isinstance(expect, Raises):
            with pytest.raises(expect.exc, match=expect.word):
                call(backend, **args)
            return
        got = call(backend, **args)
        if isinstance(expect, Shape):
            assert tuple(got.shape) == expect.shape
            return
        inputs64, args64 = build(row, True)
        want = call("reference", **args64)
    assert_same("result", got, want, expect)
    if expect.grads and inputs.leaves:
        grad_out = torch.randn(want.shape, dtype=F64, device=DEVICE).to(got.dtype)  # the same for both
        grads = torch.autograd.grad(got, inputs.leaves, grad_out)
        grads64 = torch.autograd.grad(want, inputs64.leaves, grad_out.double())
        for i, (g, g64) in enumerate(zip(grads, grads64)):
            assert g.dtype == inputs.leaves[i].dtype
            grad_expect = expect if expect.grad_rtol is None else expect._replace(rtol=expect.grad_rtol)
            assert_same(f"gradient of input {i}", g, g64, grad_expect)


def op_call(fn):
    """fn with backend=...; the reference run is the torch backend."""
    return lambda backend, **args: fn(**args, backend="torch" if backend == "reference" else backend)


# ------------------------------------------------------------------ attention_pool

def pool(c, hidden=None, q=None, scale=0.5, **kw):
    """attention_pool's arguments: by default fp32 hidden (3, 5, 8) and one head q (3, 1, 8),
    leaves (rows that need heads give q; one head keeps the interpreter's grid small)."""
    hidden = c.leaf(randn(3, 5, 8)) if hidden is None else hidden
    q = c.leaf(randn(hidden.shape[0] if hidden.dim() == 3 else 2, 1, hidden.shape[-1])) if q is None else q
    return dict(hidden=hidden, q=q, scale=scale, **kw)


def put(x, index, value=NAN):
    """x with x[index] = value (NaN by default)."""
    x = x.clone()
    x[index] = value
    return x


def cu(*offsets):
    return torch.tensor(offsets, dtype=I32)


LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
LEFT_PADS = (LEFT == 0)[..., None].expand(3, 5, 8)

POOL_ROWS = [
    # dtypes
    Row("bf16 hidden, fp32 q", lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=BF16))), Same(1e-2)),
    Row("fp16 hidden, fp16 q",
        lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=F16)), c.leaf(randn(3, 2, 8, dtype=F16))), Same(2e-3)),
    Row("fp16 hidden, bf16 q",
        lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=F16)), c.leaf(randn(3, 2, 8, dtype=BF16))), Same(2e-3)),
    Row("fp32 hidden, fp16 q", lambda c: pool(c, q=c.leaf(randn(3, 2, 8, dtype=F16))), Same(2e-3)),
    Row("fp32 hidden, fp64 q", lambda c: pool(c, q=c.leaf(randn(3, 2, 8, dtype=F64))), Same()),
    Row("fp64 hidden and q", lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=F64)), c.leaf(randn(3, 2, 8, dtype=F64))),
        Same(1e-12), refused={"cuda": "float64"}),
    Row("integer hidden", lambda c: pool(c, torch.ones(3, 5, 8, dtype=torch.int64)), Raises(TypeError, "hidden")),
    Row("bool hidden", lambda c: pool(c, torch.ones(3, 5, 8, dtype=torch.bool)), Raises(TypeError, "hidden")),
    Row("complex hidden", lambda c: pool(c, randn(3, 5, 8).to(torch.complex64)), Raises(TypeError, "hidden")),
    Row("integer q", lambda c: pool(c, q=torch.ones(3, 2, 8, dtype=I32)), Raises(TypeError, "q")),
    Row("hidden a list", lambda c: pool(c, [[[1.0]]], q=randn(1, 1, 1)), Raises(TypeError, "hidden")),
    # strides
    Row("hidden with a strided last dim", lambda c: pool(c, c.leaf(randn(3, 5, 16))[..., ::2]), Same()),
    Row("hidden expanded over the batch", lambda c: pool(c, c.leaf(randn(1, 5, 8)).expand(3, 5, 8)), Same()),
    Row("hidden expanded over D_p", lambda c: pool(c, c.leaf(randn(3, 5, 1)).expand(3, 5, 8)), Same()),
    Row("hidden at a storage offset", lambda c: pool(c, c.leaf(randn(4, 5, 8))[1:]), Same()),
    Row("transposed packed hidden", lambda c: pool(c, c.leaf(randn(8, 9)).T, cu_seqlens=c.on(cu(0, 4, 9))), Same()),
    Row("q expanded over the batch and heads", lambda c: pool(c, q=c.leaf(randn(1, 1, 8)).expand(3, 2, 8)), Same()),
    Row("transposed mask", lambda c: pool(c, mask=c.on(LEFT.T.contiguous()).T), Same()),
    Row("mask expanded over the batch", lambda c: pool(c, mask=c.on(LEFT[:1]).expand(3, 5)), Same()),
    # masks
    Row("int64 mask of 7 and -3", lambda c: pool(c, mask=c.on(LEFT * torch.tensor([7, -3, 7, -3, 7]))), Same()),
    Row("int32 mask of 256", lambda c: pool(c, mask=c.on(LEFT.to(I32) * 256)), Same()),
    Row("uint8 mask of 255", lambda c: pool(c, mask=c.on(LEFT.to(torch.uint8) * 255)), Same()),
    Row("int8 mask of -1", lambda c: pool(c, mask=c.on(-LEFT.to(torch.int8))), Same()),
    Row("an all-masked row (bool)", lambda c: pool(c, mask=c.on(put(LEFT, 1, 0).bool())), Raises(ValueError, "mask")),
    Row("an all-masked row (int)", lambda c: pool(c, mask=c.on(torch.zeros(3, 5, dtype=I32))),
        Raises(ValueError, "mask")),
    Row("float mask", lambda c: pool(c, mask=c.on(LEFT.float())), Raises(TypeError, "mask")),
    Row("complex mask", lambda c: pool(c, mask=c.on(LEFT.to(torch.complex64))), Raises(TypeError, "mask")),
    # shapes and layouts
    Row("hidden 1-D", lambda c: pool(c, randn(8), randn(1, 2, 8)), Raises(ValueError, "hidden")),
    Row("hidden 4-D", lambda c: pool(c, randn(3, 5, 8, 1)), Raises(ValueError, "hidden")),
    Row("q 2-D", lambda c: pool(c, q=randn(3, 8)), Raises(ValueError, "q")),
    Row("q of another batch", lambda c: pool(c, q=randn(4, 2, 8)), Raises(ValueError, "q")),
    Row("q of another D_p", lambda c: pool(c, q=randn(3, 2, 9)), Raises(ValueError, "q")),
    Row("scale a string", lambda c: pool(c, scale="0.5"), Raises(TypeError, "scale")),
    Row("mask of another S", lambda c: pool(c, mask=c.on(torch.ones(3, 6, dtype=torch.bool))),
        Raises(ValueError, "mask")),
    Row("mask (S, B)", lambda c: pool(c, mask=c.on(LEFT.T.contiguous())), Raises(ValueError, "mask")),
    Row("mask a list", lambda c: pool(c, mask=LEFT.tolist()), Raises(TypeError, "mask")),
    Row("mask with packed hidden",
        lambda c: pool(c, randn(9, 8), mask=c.on(torch.ones(9, dtype=torch.bool)), cu_seqlens=c.on(cu(0, 4, 9))),
        Raises(ValueError, "mask")),
    Row("cu_seqlens with padded hidden", lambda c: pool(c, cu_seqlens=c.on(cu(0, 5, 10, 15))),
        Raises(ValueError, "cu_seqlens")),
    Row("packed hidden without cu_seqlens", lambda c: pool(c, randn(9, 8), randn(2, 2, 8)),
        Raises(ValueError, "cu_seqlens")),
    Row("cu_seqlens int64", lambda c: pool(c, randn(9, 8), cu_seqlens=c.on(torch.tensor([0, 4, 9]))),
        Raises(TypeError, "cu_seqlens")),
    Row("cu_seqlens 2-D", lambda c: pool(c, randn(9, 8), cu_seqlens=c.on(cu(0, 4, 4, 9).view(2, 2))),
        Raises(ValueError, "cu_seqlens")),
    Row("cu_seqlens not from 0", lambda c: pool(c, randn(9, 8), cu_seqlens=c.on(cu(1, 4, 9))),
        Raises(ValueError, "cu_seqlens")),
    Row("cu_seqlens not ending at N", lambda c: pool(c, randn(9, 8), cu_seqlens=c.on(cu(0, 4, 8))),
        Raises(ValueError, "cu_seqlens")),
    Row("cu_seqlens decreasing", lambda c: pool(c, randn(9, 8), randn(3, 2, 8), cu_seqlens=c.on(cu(0, 5, 4, 9))),
        Raises(ValueError, "cu_seqlens")),
    Row("cu_seqlens of another batch than q",
        lambda c: pool(c, randn(9, 8), randn(3, 2, 8), cu_seqlens=c.on(cu(0, 4, 9))),
        Raises(ValueError, "q")),
    # zero and unit sizes
    Row("B = 0", lambda c: pool(c, randn(0, 5, 8), randn(0, 2, 8)), Raises(ValueError, "hidden")),
    Row("S = 0", lambda c: pool(c, randn(3, 0, 8)), Raises(ValueError, "hidden")),
    Row("D_p = 0", lambda c: pool(c, randn(3, 5, 0), randn(3, 2, 0)), Raises(ValueError, "hidden")),
    Row("n_h = 0", lambda c: pool(c, q=randn(3, 0, 8)), Raises(ValueError, "q")),
    Row("packed N = 0", lambda c: pool(c, randn(0, 8), cu_seqlens=c.on(cu(0))), Raises(ValueError, "cu_seqlens")),
    Row("an empty packed sequence", lambda c: pool(c, randn(9, 8), cu_seqlens=c.on(cu(0, 0, 9))),
        Raises(ValueError, "cu_seqlens")),
    Row("S = 1, D_p = 1, one head", lambda c: pool(c, c.leaf(randn(3, 1, 1)), c.leaf(randn(3, 1, 1))), Same()),
    # magnitudes
    Row("fp32 hidden 1e18, q 1e-18",
        lambda c: pool(c, c.leaf(randn(3, 5, 8, scale=1e18)), c.leaf(randn(3, 2, 8, scale=1e-18))), Same()),
    Row("fp32 hidden 1e30, scale 1e-30", lambda c: pool(c, c.leaf(randn(3, 5, 8, scale=1e30)), scale=1e-30), Same()),
    Row("denormal hidden", lambda c: pool(c, c.leaf(randn(3, 5, 8, scale=1e-40))), Same(atol=1e-37)),
    Row("fp16 hidden near 3e4", lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=F16, scale=1e4)), scale=1e-5),
        Same(2e-3)),
    Row("scale 0: the mean of the valid rows", lambda c: pool(c, scale=0.0, mask=c.on(LEFT)), Same()),
    Row("negative scale", lambda c: pool(c, scale=-3.0), Same()),
    # A saturated softmax: its gradient is a cancellation of O(scale |grad| |h|^2) terms, which
    # the compiled backward sums in another order than torch; only the one-hot forward is compared.
    Row("scale 1e30: a one-hot softmax", lambda c: pool(c, scale=1e30), Same(grads=False)),
    Row("scale beyond fp32", lambda c: pool(c, scale=1e39), Raises(ValueError, "scale")),
    Row("scale beyond fp32 with fp64 hidden", lambda c: pool(c, c.leaf(randn(3, 5, 8, dtype=F64)), scale=-1e39),
        Same(grads=False), refused={"cuda": "float64"}),
    Row("scale NaN", lambda c: pool(c, scale=NAN), Raises(ValueError, "scale")),
    Row("scale a 0-d tensor", lambda c: pool(c, scale=torch.tensor(0.5)), Raises(TypeError, "scale")),
    Row("scale a bool", lambda c: pool(c, scale=True), Raises(TypeError, "scale")),
    Row("scale a numpy float32", lambda c: pool(c, scale=np.float32(0.25)), Same()),
    # non-finite values
    Row("NaN at a valid position: that sequence only", lambda c: pool(c, c.leaf(put(randn(3, 5, 8), (0, 2, 3)))),
        Same(poisoned=(0,))),
    Row("-inf at a valid position: that sequence only", lambda c: pool(c, c.leaf(put(randn(3, 5, 8), (2, 4, 0), -INF))),
        Same(poisoned=(2,))),
    Row("NaN at a valid position, checked", lambda c: pool(c, put(randn(3, 5, 8), (0, 2, 3))),
        Raises(ValueError, "hidden"), checks=True),
    Row("inf at a valid position, checked", lambda c: pool(c, put(randn(3, 5, 8), (1, 2, 3), INF)),
        Raises(ValueError, "hidden"), checks=True),
    Row("inf in q, checked", lambda c: pool(c, q=put(randn(3, 2, 8), (1, 1, 1), INF)), Raises(ValueError, "q"),
        checks=True),
    Row("NaN in pad rows only, checked", lambda c: pool(c, c.leaf(put(randn(3, 5, 8), LEFT_PADS)), mask=c.on(LEFT)),
        Same(), checks=True),
    # devices
    Row("q on another device", lambda c: pool(c, q=randn(3, 2, 8).to("meta")), Raises(ValueError, "q")),
    Row("mask on another device", lambda c: pool(c, mask=LEFT.to("meta")), Raises(ValueError, "mask")),
    Row("cu_seqlens on another device", lambda c: pool(c, randn(9, 8), cu_seqlens=cu(0, 4, 9).to("meta")),
        Raises(ValueError, "cu_seqlens")),
    Row("everything on meta, with a mask",
        lambda c: pool(c, randn(3, 5, 8).to("meta"), randn(3, 2, 8).to("meta"), mask=LEFT.to("meta")),
        Shape((3, 2, 8)), refused={"triton": "got tensors on meta", "cuda": "got tensors on meta"}),
    Row("packed on meta",
        lambda c: pool(c, randn(9, 8).to("meta"), randn(2, 2, 8).to("meta"), cu_seqlens=cu(0, 4, 9).to("meta")),
        Raises(ValueError, "cu_seqlens")),
]


@pytest.mark.parametrize("row", POOL_ROWS, ids=[r.id for r in POOL_ROWS])
def test_attention_pool(row, backend, request):
    check(op_call(attention_pool), row, backend, request)


# ------------------------------------------------------------------ grebt_loss

def grebt(c, rewards=None, **kw):
    """grebt_loss's arguments: by default 12 fp32 rewards (a leaf) in groups of 4, "none"."""
    rewards = c.leaf(randn(12, scale=2.0)) if rewards is None else rewards
    if "cu_groups" not in kw:
        kw.setdefault("group_size", 4)
    return dict(rewards=rewards, reduction=kw.pop("reduction", "none"), **kw)


FP32_MAX, FP32_TINY = torch.finfo(F32).max, torch.finfo(F32).tiny
# Rewards near float32's largest have gradients near 1e-39, below its normal range: a GPU's fast
# math may flush them to zero.
FLUSHED = FP32_TINY if HAS_CUDA else 0.0
# Groups of 4 whose sum (the second) or r_w - r_l (the others) overflows float32; the first is
# issue 20's.
HUGE = torch.tensor([3e38, 2e38, -3e38, 1e38, 3e38, 3.3e38, 1e38, 2e38, -3.3e38, -3e38, 3.3e38, -1e38])

GREBT_ROWS = [
    Row("fp16 rewards near 3e4", lambda c: grebt(c, c.leaf(randn(12, dtype=F16, scale=1e4))), Same(2e-3)),
    Row("bf16 rewards", lambda c: grebt(c, c.leaf(randn(12, dtype=BF16))), Same(1e-2)),
    Row("fp64 rewards", lambda c: grebt(c, c.leaf(randn(12, dtype=F64))), Same(1e-12), refused={"cuda": "float64"}),
    Row("integer rewards", lambda c: grebt(c, torch.ones(12, dtype=torch.int64)), Raises(TypeError, "rewards")),
    Row("bool rewards", lambda c: grebt(c, torch.ones(12, dtype=torch.bool)), Raises(TypeError, "rewards")),
    Row("complex rewards", lambda c: grebt(c, randn(12).to(torch.complex64)), Raises(TypeError, "rewards")),
    Row("0-d rewards", lambda c: grebt(c, randn(1)[0], group_size=1), Raises(ValueError, "rewards")),
    Row("rewards with stride 3", lambda c: grebt(c, c.leaf(randn(36))[::3]), Same()),
    Row("rewards expanded: equal groups", lambda c: grebt(c, c.leaf(randn(1)).expand(12)), Same()),
    Row("rewards at a storage offset", lambda c: grebt(c, c.leaf(randn(15))[3:]), Same()),
    Row("rewards 2-D", lambda c: grebt(c, randn(3, 4)), Raises(ValueError, "rewards")),
    Row("rewards a list", lambda c: grebt(c, [1.0, 2.0], group_size=2), Raises(TypeError, "rewards")),
    Row("group_size not dividing B", lambda c: grebt(c, group_size=5), Raises(ValueError, "group_size")),
    Row("group_size 0", lambda c: grebt(c, group_size=0), Raises(ValueError, "group_size")),
    Row("group_size a float", lambda c: grebt(c, group_size=4.0), Raises(TypeError, "group_size")),
    Row("neither group_size nor cu_groups", lambda c: grebt(c, group_size=None), Raises(ValueError, "group_size")),
    Row("both group_size and cu_groups", lambda c: grebt(c, cu_groups=c.on(cu(0, 12)), group_size=4),
        Raises(ValueError, "cu_groups")),
    Row("cu_groups not ending at B", lambda c: grebt(c, cu_groups=c.on(cu(0, 5, 11))), Raises(ValueError, "cu_groups")),
    Row("cu_groups not from 0", lambda c: grebt(c, cu_groups=c.on(cu(2, 5, 12))), Raises(ValueError, "cu_groups")),
    Row("alpha above 1", lambda c: grebt(c, alpha=1.5), Raises(ValueError, "alpha")),
    Row("alpha below 0", lambda c: grebt(c, alpha=-0.1), Raises(ValueError, "alpha")),
    Row("alpha NaN", lambda c: grebt(c, alpha=NAN), Raises(ValueError, "alpha")),
    Row("eps 0", lambda c: grebt(c, eps=0.0), Raises(ValueError, "eps")),
    Row("eps negative", lambda c: grebt(c, eps=-1e-6), Raises(ValueError, "eps")),
    Row("cu_groups expanded", lambda c: grebt(c, cu_groups=c.on(cu(0)).expand(3)), Raises(ValueError, "cu_groups")),
    Row("cu_groups int64", lambda c: grebt(c, cu_groups=c.on(torch.tensor([0, 5, 12]))),
        Raises(TypeError, "cu_groups")),
    Row("B = 0", lambda c: grebt(c, randn(0), group_size=1), Raises(ValueError, "rewards")),
    Row("an empty group", lambda c: grebt(c, cu_groups=c.on(cu(0, 5, 5, 12))), Raises(ValueError, "cu_groups")),
    Row("B = 1", lambda c: grebt(c, c.leaf(randn(1)), group_size=1), Same()),
    Row("one group of every reward", lambda c: grebt(c, group_size=12, reduction="mean"), Same()),
    Row("groups of 1 at both ends", lambda c: grebt(c, cu_groups=c.on(cu(0, 1, 11, 12)), reduction="sum"), Same()),
    Row("group_size a numpy int", lambda c: grebt(c, group_size=np.int64(4)), Raises(TypeError, "group_size")),
    Row("group_size a bool", lambda c: grebt(c, group_size=True), Raises(TypeError, "group_size")),
    Row("alpha an int", lambda c: grebt(c, alpha=1), Same()),
    Row("fp32 rewards 1e30", lambda c: grebt(c, c.leaf(randn(12, scale=1e30))), Same()),
    Row("fp32 rewards 1e-30", lambda c: grebt(c, c.leaf(randn(12, scale=1e-30))), Same()),
    Row("eps 1e-30", lambda c: grebt(c, eps=1e-30), Same()),
    Row("eps below fp32's normal range", lambda c: grebt(c, eps=1e-40), Raises(ValueError, "eps")),
    Row("eps 1e-300 with fp64 rewards", lambda c: grebt(c, c.leaf(randn(12, dtype=F64)), eps=1e-300), Same(1e-12),
        refused={"cuda": "float64"}),
    Row("eps 1e39", lambda c: grebt(c, eps=1e39), Same()),
    Row("fp32 rewards near 3e38: sums and r_w - r_l overflow", lambda c: grebt(c, c.leaf(HUGE)), Same(atol=FLUSHED)),
    Row("fp32 rewards +-float32's max beside ordinary ones",
        lambda c: grebt(c, c.leaf(put(put(randn(12), 1, FP32_MAX), 3, -FP32_MAX)), reduction="mean"), Same(atol=FLUSHED)),
    Row("bf16 rewards near 3e38", lambda c: grebt(c, c.leaf(HUGE.to(BF16))), Same(1e-2, atol=FLUSHED)),
    Row("equal rewards at float32's max", lambda c: grebt(c, c.leaf(torch.full((1,), FP32_MAX)).expand(12)), Same()),
    Row("fp64 rewards near 1e308", lambda c: grebt(c, c.leaf(randn(12, dtype=F64, scale=1e308))), Same(1e-12),
        refused={"cuda": "float64"}),
    Row("eps at float32's smallest normal", lambda c: grebt(c, eps=FP32_TINY), Same()),
    Row("eps just below float32's smallest normal", lambda c: grebt(c, eps=FP32_TINY * (1 - 1e-9)),
        Raises(ValueError, "eps")),
    Row("eps at its bound, equal rewards at float32's max",
        lambda c: grebt(c, c.leaf(torch.full((1,), FP32_MAX)).expand(12), eps=FP32_TINY), Same()),
    Row("eps 1e30 with rewards 1e-30", lambda c: grebt(c, c.leaf(randn(12, scale=1e-30)), eps=1e30), Same()),
    Row("reduction None", lambda c: grebt(c, reduction=None), Raises(ValueError, "reduction")),
    Row("reduction 'MEAN'", lambda c: grebt(c, reduction="MEAN"), Raises(ValueError, "reduction")),
    Row("NaN reward: that group only", lambda c: grebt(c, c.leaf(put(randn(12), 5))), Same(poisoned=(1,), grads=False)),
    Row("inf reward: that group only", lambda c: grebt(c, c.leaf(put(randn(12), 0, INF))),
        Same(poisoned=(0,), grads=False)),
    Row("NaN reward, checked", lambda c: grebt(c, put(randn(12), 5)), Raises(ValueError, "rewards"), checks=True),
    Row("inf reward, checked", lambda c: grebt(c, put(randn(12), 5, -INF)), Raises(ValueError, "rewards"), checks=True),
    Row("cu_groups on another device", lambda c: grebt(c, cu_groups=cu(0, 3, 12).to("meta")),
        Raises(ValueError, "cu_groups")),
    Row("rewards on meta", lambda c: grebt(c, randn(12).to("meta")), Shape((3,)),
        refused={"triton": "got tensors on meta", "cuda": "got tensors on meta"}),
    Row("rewards and cu_groups on meta", lambda c: grebt(c, randn(12).to("meta"), cu_groups=cu(0, 3, 12).to("meta")),
        Raises(ValueError, "cu_groups")),
]


@pytest.mark.parametrize("row", GREBT_ROWS, ids=[r.id for r in GREBT_ROWS])
def test_grebt_loss(row, backend, request):
    check(op_call(grebt_loss), row, backend, request)


# ------------------------------------------------------------------ score_mix

def mix(c, attended=None, rte=None, out_weight=None, score_weight=None, score_bias="default", omega=0.3):
    """score_mix's arguments: by default fp32 attended (3, 4), rte (3, 5), W_o (5, 4), w (1, 5),
    b (1,), all leaves."""
    return dict(attended=c.leaf(randn(3, 4)) if attended is None else attended,
                rte=c.leaf(randn(3, 5)) if rte is None else rte,
                out_weight=c.leaf(randn(5, 4)) if out_weight is None else out_weight,
                score_weight=c.leaf(randn(1, 5)) if score_weight is None else score_weight,
                score_bias=c.leaf(randn(1)) if isinstance(score_bias, str) else score_bias, omega=omega)


SCORE_MIX_ROWS = [
    Row("every input fp16",
        lambda c: mix(c, *(c.leaf(randn(*s, dtype=F16)) for s in ((3, 4), (3, 5), (5, 4), (1, 5), (1,)))), Same()),
    Row("every input bf16",
        lambda c: mix(c, *(c.leaf(randn(*s, dtype=BF16)) for s in ((3, 4), (3, 5), (5, 4), (1, 5), (1,)))), Same()),
    Row("fp64 score head: fp64 rewards",
        lambda c: mix(c, score_weight=c.leaf(randn(1, 5, dtype=F64)), score_bias=c.leaf(randn(1, dtype=F64))),
        Same(1e-12)),
    Row("fp64 attended, fp32 score head", lambda c: mix(c, c.leaf(randn(3, 4, dtype=F64))), Same()),
    Row("bf16 rte", lambda c: mix(c, rte=c.leaf(randn(3, 5, dtype=BF16))), Same()),
    Row("integer out_weight", lambda c: mix(c, out_weight=torch.ones(5, 4, dtype=I32)),
        Raises(TypeError, "out_weight")),
    Row("integer score_bias", lambda c: mix(c, score_bias=torch.ones(1, dtype=I32)), Raises(TypeError, "score_bias")),
    Row("complex rte", lambda c: mix(c, rte=randn(3, 5).to(torch.complex64)), Raises(TypeError, "rte")),
    Row("0-d score_bias", lambda c: mix(c, score_bias=randn(1)[0]), Raises(ValueError, "score_bias")),
    Row("without score_bias", lambda c: mix(c, score_bias=None), Same()),
    Row("out_weight a transposed (d, D_rm)", lambda c: mix(c, out_weight=c.leaf(randn(4, 5)).T), Same()),
    Row("score_weight a transposed (D_rm, 1)", lambda c: mix(c, score_weight=c.leaf(randn(5, 1)).T), Same()),
    Row("transposed attended", lambda c: mix(c, c.leaf(randn(4, 3)).T), Same()),
    Row("attended expanded over the batch", lambda c: mix(c, c.leaf(randn(1, 4)).expand(3, 4)), Same()),
    Row("rte with a strided last dim", lambda c: mix(c, rte=c.leaf(randn(3, 10))[:, ::2]), Same()),
    Row("out_weight with a strided last dim", lambda c: mix(c, out_weight=c.leaf(randn(5, 8))[:, ::2]), Same()),
    Row("B = 0", lambda c: mix(c, randn(0, 4), randn(0, 5)), Raises(ValueError, "attended")),
    Row("d = 0", lambda c: mix(c, randn(3, 0), out_weight=randn(5, 0)), Raises(ValueError, "attended")),
    Row("D_rm = 0", lambda c: mix(c, rte=randn(3, 0), out_weight=randn(0, 4), score_weight=randn(1, 0)),
        Raises(ValueError, "rte")),
    Row("rte of another batch", lambda c: mix(c, rte=randn(2, 5)), Raises(ValueError, "rte")),
    Row("out_weight transposed", lambda c: mix(c, out_weight=randn(4, 5)), Raises(ValueError, "out_weight")),
    Row("score_weight 1-D", lambda c: mix(c, score_weight=randn(5)), Raises(ValueError, "score_weight")),
    Row("score_bias of 2", lambda c: mix(c, score_bias=randn(2)), Raises(ValueError, "score_bias")),
    Row("omega 0", lambda c: mix(c, omega=0.0), Same()),
    Row("omega an int 1", lambda c: mix(c, omega=1), Same()),
    Row("omega a bool", lambda c: mix(c, omega=True), Raises(TypeError, "omega")),
    Row("omega 1.5", lambda c: mix(c, omega=1.5), Raises(ValueError, "omega")),
    Row("omega NaN", lambda c: mix(c, omega=NAN), Raises(ValueError, "omega")),
    Row("attended 1e36, out_weight 1e-36",
        lambda c: mix(c, c.leaf(randn(3, 4, scale=1e36)), out_weight=c.leaf(randn(5, 4, scale=1e-36))),
        Same(grads=False)),
    Row("rte 1e30", lambda c: mix(c, rte=c.leaf(randn(3, 5, scale=1e30))), Same()),
    Row("NaN attended: that reward only", lambda c: mix(c, c.leaf(put(randn(3, 4), (1, 2)))),
        Same(poisoned=(1,), grads=False)),
    Row("NaN attended, checked", lambda c: mix(c, put(randn(3, 4), (1, 2))), Raises(ValueError, "attended"),
        checks=True),
    Row("inf rte, checked", lambda c: mix(c, rte=put(randn(3, 5), (0, 0), INF)), Raises(ValueError, "rte"),
        checks=True),
    Row("rte on another device", lambda c: mix(c, rte=randn(3, 5).to("meta")), Raises(ValueError, "rte")),
    Row("score_bias on another device", lambda c: mix(c, score_bias=randn(1).to("meta")),
        Raises(ValueError, "score_bias")),
    Row("everything on meta", lambda c: mix(c, *(randn(*s).to("meta") for s in ((3, 4), (3, 5), (5, 4), (1, 5), (1,)))),
        Shape((3,)), refused={"triton": "got tensors on meta", "cuda": "got tensors on meta"}),
]


@pytest.mark.parametrize("row", SCORE_MIX_ROWS, ids=[r.id for r in SCORE_MIX_ROWS])
def test_score_mix(row, backend, request):
    check(op_call(score_mix), row, backend, request)


# ------------------------------------------------------------------ R2MHead

def head(c, rte=None, hidden=None, method="forward", dtype=F32, **kw):
    """An R2MHead(6, 8, attn_dim 4, 2 heads, total_steps 10) of `dtype` with weights of a
    fixed seed, called with rte (3, 6) and hidden (3, 5, 8), fp32 leaves by default."""
    return dict(rte=c.leaf(randn(3, 6)) if rte is None else rte,
                hidden=c.leaf(randn(3, 5, 8)) if hidden is None else hidden, method=method, dtype=dtype, **kw)


def head_call(backend, rte, hidden, method, dtype, **kw):
    """The head's `method`; the reference run is the eager head in float64."""
    torch.manual_seed(11)
    reference = backend == "reference"
    module = R2MHead(6, 8, attn_dim=4, num_heads=2, total_steps=10, backend="eager" if reference else backend)
    module = module.to(DEVICE, F64 if reference else dtype)
    return getattr(module, method)(rte, hidden, **kw)


# ds_t = a_t (delta_t - D) with D = grad . pooled, as flash-attention's backward: D is summed in
# another order than delta_t = grad . h_t, so with |h| ~ 1e4 and a nearly one-hot softmax (true
# dq tiny) their rounding, ~1e-7 |grad| |h|, dominates dq (docs/design.md §2.3). The torch
# backend's autograd takes D from the same delta_t. How far the compiled backends' dq lands
# depends on the summation order, which for the cuda contract model is the CPU's own (a draw
# that passed 2e-3 on one CPU failed it on another), so its gradients are held only to the
# size of the gradient itself: finite, and of the right magnitude, not to rounding.
D_FROM_POOLED = Same(2e-3, grad_rtol=1.0)

HEAD_ROWS = [
    Row("fp16 rte and hidden near 1e4",
        lambda c: head(c, c.leaf(randn(3, 6, dtype=F16)), c.leaf(randn(3, 5, 8, dtype=F16, scale=1e4)),
                                                      omega=0.5), Same(2e-3),
        per_backend={"cuda": D_FROM_POOLED}),
    Row("bf16 hidden", lambda c: head(c, hidden=c.leaf(randn(3, 5, 8, dtype=BF16)), omega=0.5), Same(2e-2)),
    Row("a head cast to fp64", lambda c: head(c, dtype=F64, omega=0.5), Same(1e-5)),
    Row("packed hidden, strided cu_seqlens",
        lambda c: head(c, hidden=c.leaf(randn(15, 8)), cu_seqlens=c.on(cu(0, 9, 4, 9, 11, 9, 15, 9))[::2],
                                                             omega=0.5), Same()),
    Row("left-padded int mask, NaN pads",
        lambda c: head(c, hidden=c.leaf(put(randn(3, 5, 8), LEFT_PADS)), mask=c.on(LEFT), omega=0.2),
        Same()),
    Row("transposed hidden", lambda c: head(c, hidden=c.leaf(randn(5, 3, 8)).transpose(0, 1), step=3), Same()),
    Row("attend", lambda c: head(c, method="attend"), Same()),
    Row("embed at a fractional step", lambda c: head(c, method="embed", step=2.5), Same()),
    Row("omega 1: the RM's score", lambda c: head(c, omega=1.0), Same()),
    Row("rte of another width", lambda c: head(c, randn(3, 7)), Raises(ValueError, "rte")),
    Row("rte of another batch", lambda c: head(c, randn(4, 6)), Raises(ValueError, "rte")),
    Row("hidden of another width", lambda c: head(c, hidden=randn(3, 5, 9)), Raises(ValueError, "policy_dim")),
    Row("integer rte", lambda c: head(c, torch.ones(3, 6, dtype=I32)), Raises(TypeError, "rte")),
    Row("hidden a list", lambda c: head(c, hidden=[[[0.0] * 8] * 5] * 3), Raises(TypeError, "hidden")),
    Row("an all-masked row", lambda c: head(c, mask=c.on(torch.zeros(3, 5, dtype=torch.int64))),
        Raises(ValueError, "mask")),
    Row("step and omega", lambda c: head(c, step=1, omega=0.5), Raises(ValueError, "step or omega")),
    Row("step inf", lambda c: head(c, step=INF), Raises(ValueError, "step")),
    Row("omega a tensor", lambda c: head(c, omega=torch.tensor(0.5)), Raises(TypeError, "omega")),
    Row("rte on another device", lambda c: head(c, randn(3, 6).to("meta")), Raises(ValueError, "rte")),
    Row("NaN rte, checked", lambda c: head(c, put(randn(3, 6), (1, 1))), Raises(ValueError, "rte"), checks=True),
]

# triton's pool and score_mix have their own tables above; the head adds no triton-specific path.
HEAD_BACKENDS = params(["eager", "torch", "cuda"])


@pytest.mark.parametrize("row", HEAD_ROWS, ids=[r.id for r in HEAD_ROWS])
@pytest.mark.parametrize("head_backend", HEAD_BACKENDS)
def test_r2m_head(row, head_backend, monkeypatch, request):
    check(head_call, row, use(head_backend, monkeypatch), request)


# ------------------------------------------------------------------ the other public functions

class Call(NamedTuple):
    id: str
    call: Callable[[], object]
    expect: object  # a value, or Raises


def nan_pool_under(context):
    hidden = put(randn(1, 2, 3), (0, 0, 0))
    with context:
        return attention_pool(hidden, randn(1, 1, 3), 1.0).isnan().any().item()


def raise_inside_finite_checks():
    with contextlib.suppress(KeyError), finite_checks():
        raise KeyError
    return nan_pool_under(contextlib.nullcontext())


CALLS = [
    Call("available_backends of an unknown op", lambda: r2m_kernels.available_backends("pool"),
        Raises(ValueError, "op")),
    Call("available_backends on meta", lambda: r2m_kernels.available_backends(device="meta"), ["torch"]),
    Call("available_backends of score_mix on cuda",
        lambda: "triton" in r2m_kernels.available_backends("score_mix", "cuda"), True),
    Call("why_unavailable of an unknown backend", lambda: r2m_kernels.why_unavailable("fast"),
        Raises(ValueError, "backend")),
    Call("why_unavailable of auto", lambda: r2m_kernels.why_unavailable("auto"), Raises(ValueError, "backend")),
    Call("why_unavailable of an unknown op", lambda: r2m_kernels.why_unavailable("torch", "loss"),
        Raises(ValueError, "op")),
    Call("why_unavailable of triton on meta", lambda: "meta" in r2m_kernels.why_unavailable("triton", device="meta"),
        True),
    Call("finite_checks off by default", lambda: nan_pool_under(contextlib.nullcontext()), True),
    Call("finite_checks(False) inside finite_checks()", lambda: nan_pool_under(finite_checks(False)), True),
    Call("finite_checks as a decorator", lambda: finite_checks()(nan_pool_under)(contextlib.nullcontext()),
        Raises(ValueError, "hidden")),
    Call("finite_checks restored after an exception", raise_inside_finite_checks, True),
    Call("R2MHead with num_heads 0", lambda: R2MHead(6, 8, 4, 0), Raises(ValueError, "num_heads")),
    Call("R2MHead with attn_dim not divisible", lambda: R2MHead(6, 8, 10, 3), Raises(ValueError, "attn_dim")),
    Call("R2MHead with rm_dim 0", lambda: R2MHead(0, 8, 4, 2), Raises(ValueError, "rm_dim")),
    Call("R2MHead with a float policy_dim", lambda: R2MHead(6, 8.0, 4, 2), Raises(TypeError, "policy_dim")),
    Call("R2MHead with total_steps True", lambda: R2MHead(6, 8, 4, 2, total_steps=True),
        Raises(TypeError, "total_steps")),
    Call("R2MHead with total_steps 0", lambda: R2MHead(6, 8, 4, 2, total_steps=0), Raises(ValueError, "total_steps")),
    Call("R2MHead with omega_floor NaN", lambda: R2MHead(6, 8, 4, 2, omega_floor=NAN),
        Raises(ValueError, "omega_floor")),
    Call("R2MHead with an unknown backend", lambda: R2MHead(6, 8, 4, 2, backend="flash"),
        Raises(ValueError, "backend")),
    Call("R2MHead.backend set to an unknown name", lambda: setattr(R2MHead(6, 8, 4, 2), "backend", "fast"),
        Raises(ValueError, "backend")),
    Call("from_score_head of a 2-output Linear", lambda: R2MHead.from_score_head(nn.Linear(6, 2), 8),
        Raises(ValueError, "out_features")),
    Call("from_score_head of a Conv1d", lambda: R2MHead.from_score_head(nn.Conv1d(6, 1, 1), 8),
        Raises(TypeError, "linear")),
    Call("from_score_head of an uninitialised LazyLinear", lambda: R2MHead.from_score_head(nn.LazyLinear(1), 8),
        Raises(ValueError, "rm_dim")),
    Call("from_score_head with policy_dim 0", lambda: R2MHead.from_score_head(nn.Linear(6, 1), 0),
        Raises(ValueError, "policy_dim")),
    Call("from_score_head of an fp64 Linear: an fp32 head",
        lambda: R2MHead.from_score_head(nn.Linear(6, 1).double(), 8, attn_dim=4).score.weight.dtype,
         F32),
    Call("from_score_head on meta",
        lambda: R2MHead.from_score_head(nn.Linear(6, 1, device="meta"), 8, attn_dim=4).q_proj.weight.device.type,
         "meta"),
    Call("GREBTLoss with alpha True", lambda: GREBTLoss(alpha=True), Raises(TypeError, "alpha")),
    Call("GREBTLoss with eps 0", lambda: GREBTLoss(eps=0), Raises(ValueError, "eps")),
    Call("GREBTLoss on rewards at float32's max and min",
        lambda: bool(GREBTLoss()(torch.tensor([FP32_MAX, -FP32_MAX, 3e38, 1.0]), 4).isfinite()), True),
    Call("R2MConfig with head_learning_rate 1e38", lambda: R2MConfig(head_learning_rate=1e38),
        Raises(ValueError, "head_learning_rate must be <=")),
    Call("R2MConfig with head_learning_rate at its bound",
        lambda: R2MConfig(head_learning_rate=HEAD_LEARNING_RATE_MAX).head_learning_rate, HEAD_LEARNING_RATE_MAX),
    Call("GREBTLoss with backend eager", lambda: GREBTLoss(backend="eager"), Raises(ValueError, "backend")),
    Call("GREBTLoss with reduction avg", lambda: GREBTLoss(reduction="avg"), Raises(ValueError, "reduction")),
    Call("GREBTLoss with both group_size and cu_groups", lambda: GREBTLoss()(randn(8), 4, cu_groups=cu(0, 8)),
        Raises(ValueError, "cu_groups")),
    Call("omega at a step beyond float's range", lambda: omega(10**400, 10, 0.2), Raises(ValueError, "step")),
    Call("omega at step -0.0", lambda: omega(-0.0, 10, 0.0), 1.0),
    Call("omega at a numpy step", lambda: omega(np.float64(5.0), 10, 0.0), 0.5),
    Call("omega with total_steps 2**70", lambda: omega(3, 2**70, 0.0), 1.0),
    Call("omega with total_steps a numpy int", lambda: omega(1, np.int64(10), 0.5), Raises(TypeError, "total_steps")),
    Call("omega with floor 1", lambda: [omega(t, 10, 1.0) for t in (0, 5, 10)], [1.0, 1.0, 1.0]),
    Call("omega at a step of 1e308 of 2**62", lambda: omega(1e308, 2**62, 0.0), 0.0),
]


@pytest.mark.parametrize("case", CALLS, ids=[c.id for c in CALLS])
def test_public_helpers(case):
    if isinstance(case.expect, Raises):
        with pytest.raises(case.expect.exc, match=case.expect.word):
            case.call()
    else:
        got = case.call()
        assert got == case.expect and type(got) is type(case.expect), got
