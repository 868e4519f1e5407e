"""The one place that checks inputs of the public ops.

Shape, dtype and device checks always run. Checks that need the tensors' values (an
all-masked row, cu_seqlens that do not increase) synchronise with the device once per call;
they are skipped while torch.compile traces, where a data-dependent branch would break the
graph, and for tensors on the meta device, which have no values (offsets, whose values shape
the computation, cannot be meta). NaN/Inf checks run only when enabled (`finite_checks()` or
R2M_CHECK_FINITE=1).
"""

from __future__ import annotations

import contextlib
import math
import os
from numbers import Real
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
_FP32_MAX = torch.finfo(torch.float32).max
_FP32_TINY = torch.finfo(torch.float32).tiny

_check_finite = os.environ.get("R2M_CHECK_FINITE", "0") not in ("", "0", "false", "False")


class PoolInputs(NamedTuple):
    """attention_pool's arguments after validation (cu_seqlens made contiguous)."""
    hidden: torch.Tensor
    q: torch.Tensor
    scale: float
    mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.hidden.device


class GrebtInputs(NamedTuple):
    """grebt_loss's arguments after validation (cu_groups made contiguous), with the number of
    groups and the largest group size (None while torch.compile traces: it needs the values)."""
    rewards: torch.Tensor
    group_size: int | None
    cu_groups: torch.Tensor | None
    alpha: float
    eps: float
    reduction: str
    num_groups: int
    max_group: int | None

    @property
    def device(self) -> torch.device:
        return self.rewards.device


class ScoreMixInputs(NamedTuple):
    """score_mix's arguments after validation."""
    attended: torch.Tensor
    rte: torch.Tensor
    out_weight: torch.Tensor
    score_weight: torch.Tensor
    score_bias: torch.Tensor | None
    omega: float

    @property
    def device(self) -> torch.device:
        return self.attended.device


@contextlib.contextmanager
def finite_checks(enabled: bool = True):
    """Within the block, reject NaN/Inf in the inputs of r2m_kernels ops (costs one sync)."""
    global _check_finite
    previous, _check_finite = _check_finite, bool(enabled)
    try:
        yield
    finally:
        _check_finite = previous


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _has_values(t: torch.Tensor) -> bool:
    """Whether t's values can be checked: not while tracing, not on the meta device."""
    return not _tracing() and t.device.type != "meta"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, *, ranks, dtypes=FLOAT_DTYPES, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    if t.dtype not in dtypes:
        want = ", ".join(_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}), got {_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_finite(name: str, t: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """With the finite check on: NaN/Inf in t is an error. `valid` (t's leading dims, bool):
    only those positions count (pad rows may hold anything, docs/design.md §2.1)."""
    if not (_check_finite and _has_values(t)):
        return
    finite = torch.isfinite(t)
    if valid is not None:
        finite = finite | ~valid.reshape(valid.shape + (1,) * (t.dim() - valid.dim()))
    if not bool(finite.all()):
        raise ValueError(f"{name} contains NaN or Inf" + ("" if valid is None else " at a valid position"))


def check_offsets(name: str, offsets, total: int, total_name: str, device):
    """int32 (n+1,) offsets, starting at 0, strictly increasing, ending at `total`, of any
    stride. Returns (n, the offsets contiguous, the longest segment or None while tracing)."""
    check_tensor(name, offsets, ranks=(1,), dtypes=(torch.int32,), device=device)
    if offsets.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: its values, the segment boundaries, are needed")
    if offsets.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (n+1 offsets), got shape {_shape(offsets)}")
    offsets = offsets.contiguous()  # the kernels index them as a plain array
    longest = None
    if not _tracing():
        sizes = offsets[1:] - offsets[:-1]
        # One transfer for every value the checks need.
        first, last, smallest, longest = torch.stack([offsets[0], offsets[-1], sizes.min(), sizes.max()]).tolist()
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if last != total:
            raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {last}")
        if smallest <= 0:
            raise ValueError(f"{name} must be strictly increasing (every segment non-empty)")
    return offsets.numel() - 1, offsets, longest


def check_scalar(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be finite, got an int of {value.bit_length()} bits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def validate_sequences(hidden, mask, cu_seqlens) -> tuple[int, torch.Tensor | None]:
    """Check a batch of sequences: hidden (B, S, D_p) padded, optionally with mask (B, S); or
    (N, D_p) packed with cu_seqlens (B+1,) int32. Returns (B, cu_seqlens made contiguous)."""
    check_tensor("hidden", hidden, ranks=(2, 3))
    device = hidden.device
    if hidden.shape[-1] == 0:
        raise ValueError("hidden must have a non-empty last dimension D_p")
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed hidden (N, D_p); got padded hidden "
                             f"{_shape(hidden)} (use mask for padded input)")
        batch, seqlen = hidden.shape[0], hidden.shape[1]
        if batch == 0 or seqlen == 0:
            raise ValueError(f"hidden must have at least one sequence and one position, got shape {_shape(hidden)}")
    else:
        if cu_seqlens is None:
            raise ValueError(f"packed hidden {_shape(hidden)} (N, D_p) needs cu_seqlens (B+1,) int32")
        if mask is not None:
            raise ValueError("mask is for padded hidden (B, S, D_p); packed hidden uses cu_seqlens")
        batch, cu_seqlens, _ = check_offsets("cu_seqlens", cu_seqlens, hidden.shape[0], "hidden.shape[0] (N)",
                                             device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must be bool or integer (nonzero = valid), got {mask.dtype}")
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"mask must have shape (B, S) = {tuple(hidden.shape[:2])}, got {_shape(mask)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {device}")
        if _has_values(mask):
            empty = (mask == 0).all(dim=1)
            if bool(empty.any()):
                rows = empty.nonzero().flatten()[:8].tolist()
                raise ValueError(f"mask has rows with no valid position (rows {rows}); "
                                 "attention over an empty row is undefined")
    check_finite("hidden", hidden, None if mask is None else mask != 0)
    return batch, cu_seqlens


def validate_attention_pool(hidden, q, scale, mask, cu_seqlens) -> PoolInputs:
    """Check the inputs of attention_pool: the sequences (validate_sequences), q (B, n_h, D_p)
    of a floating dtype on hidden's device, a finite scale."""
    batch, cu_seqlens = validate_sequences(hidden, mask, cu_seqlens)
    check_tensor("q", q, ranks=(3,), device=hidden.device)
    d_p = hidden.shape[-1]
    if q.shape[0] != batch or q.shape[2] != d_p:
        raise ValueError(f"q must have shape (B, n_h, D_p) = ({batch}, n_h, {d_p}), got {_shape(q)}")
    if q.shape[1] == 0:
        raise ValueError(f"q must have at least one head, got shape {_shape(q)}")
    check_finite("q", q)
    scale = check_scalar("scale", scale)
    if hidden.dtype != torch.float64 and abs(scale) > _FP32_MAX:  # folded into q in fp32
        raise ValueError(f"scale must be within float32's range for {_name(hidden.dtype)} hidden "
                         f"(the scores are fp32), got {scale}")
    return PoolInputs(hidden, q, scale, mask, cu_seqlens)


def validate_grebt(rewards, group_size, cu_groups, alpha, eps, reduction) -> GrebtInputs:
    """Check the inputs of grebt_loss."""
    check_tensor("rewards", rewards, ranks=(1,))
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards is empty")
    if (group_size is None) == (cu_groups is None):
        raise ValueError("give exactly one of group_size (uniform groups) or cu_groups (ragged groups)")
    if group_size is not None:
        check_int("group_size", group_size, low=1)
        if n % group_size:
            raise ValueError(f"group_size = {group_size} does not divide the number of rewards B = {n}")
        groups, max_group = n // group_size, group_size
    else:
        groups, cu_groups, max_group = check_offsets("cu_groups", cu_groups, n, "rewards.shape[0] (B)",
                                                     rewards.device)
    alpha = check_scalar("alpha", alpha, low=0.0, high=1.0)
    eps = check_scalar("eps", eps, low=0.0, low_open=True)
    if rewards.dtype != torch.float64 and eps < _FP32_TINY:
        # Below float32's smallest normal eps rounds (or, on a GPU, flushes) to 0, and a group
        # of equal rewards would divide 0 by 0.
        raise ValueError(f"eps must be >= {_FP32_TINY:.3g} (float32's smallest normal) for "
                         f"{_name(rewards.dtype)} rewards (the math is fp32), got {eps}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_finite("rewards", rewards)
    return GrebtInputs(rewards, group_size, cu_groups, alpha, eps, reduction, groups, max_group)


def validate_score_mix(attended, rte, out_weight, score_weight, score_bias, omega) -> ScoreMixInputs:
    """Check the inputs of score_mix: attended (B, d), rte (B, D_rm), out_weight (D_rm, d),
    score_weight (1, D_rm), score_bias (1,) or None, all on one device; omega in [0, 1]."""
    check_tensor("attended", attended, ranks=(2,))
    device = attended.device
    check_tensor("rte", rte, ranks=(2,), device=device)
    check_tensor("out_weight", out_weight, ranks=(2,), device=device)
    check_tensor("score_weight", score_weight, ranks=(2,), device=device)
    batch, attn_dim = attended.shape
    rm_dim = rte.shape[1]
    if batch == 0 or attn_dim == 0:
        raise ValueError(f"attended must be non-empty (B, d), got {_shape(attended)}")
    if rm_dim == 0:
        raise ValueError(f"rte must have a non-empty D_rm, got {_shape(rte)}")
    if rte.shape[0] != batch:
        raise ValueError(f"rte must have shape (B, D_rm) with B = {batch} (attended's), got {_shape(rte)}")
    if tuple(out_weight.shape) != (rm_dim, attn_dim):
        raise ValueError(f"out_weight must have shape (D_rm, d) = ({rm_dim}, {attn_dim}), "
                         f"got {_shape(out_weight)}")
    if tuple(score_weight.shape) != (1, rm_dim):
        raise ValueError(f"score_weight must have shape (1, D_rm) = (1, {rm_dim}), "
                         f"got {_shape(score_weight)}")
    if score_bias is not None:
        check_tensor("score_bias", score_bias, ranks=(1,), device=device)
        if score_bias.shape[0] != 1:
            raise ValueError(f"score_bias must have shape (1,), got {_shape(score_bias)}")
    check_finite("attended", attended)
    check_finite("rte", rte)
    omega = check_scalar("omega", omega, low=0.0, high=1.0)
    return ScoreMixInputs(attended, rte, out_weight, score_weight, score_bias, omega)
