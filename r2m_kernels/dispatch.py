"""The one place that picks a backend for an op (docs/design.md §7).

A backend registers, per op, an implementation and two probes: whether it can run on a
device at all (`why_not_device`), and whether it can run *these* inputs (`why_not_inputs`,
which sees the validated inputs: shapes, dtypes, group sizes). Each returns None when it can,
else the reason. `resolve` turns the user's `backend=` into an implementation: "auto" takes
the first backend in AUTO_ORDER for the tensors' device type whose probes accept the inputs,
so it never picks a backend that then refuses them; an explicit name that cannot run raises
BackendUnavailableError with the reason, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda")
OPS = ("attention_pool", "grebt_loss", "score_mix")

# Preference of "auto" per device type and op. The plain-PyTorch reference is the CPU default:
# the Triton interpreter is for testing, not speed. On a GPU: triton, cuda, torch;
# benchmarks/RESULTS.md records what the order rests on.
AUTO_ORDER = {
    "cuda": {"attention_pool": ("triton", "cuda", "torch"),
             "grebt_loss": ("triton", "cuda", "torch"),
             "score_mix": ("triton", "cuda", "torch")},
    "cpu": {op: ("torch",) for op in OPS},
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for these inputs on this machine."""


@dataclass(frozen=True)
class _Entry:
    fn: Callable
    why_not_device: Callable[[torch.device], str | None]
    why_not_inputs: Callable[..., str | None] | None  # sees the op's validated inputs


_REGISTRY: dict[tuple[str, str], _Entry] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it could not even be imported


def register(op: str, backend: str, fn: Callable, why_not_device: Callable[[torch.device], str | None],
             why_not_inputs: Callable[..., str | None] | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`. why_not_device(device) and
    why_not_inputs(inputs) (inputs: validation's record of the op's arguments) return None
    when the backend can run, else the reason."""
    assert op in OPS and backend in BACKENDS, (op, backend)
    _REGISTRY[(op, backend)] = _Entry(fn, why_not_device, why_not_inputs)


def mark_unavailable(backend: str, reason: str) -> None:
    _UNAVAILABLE[backend] = reason


def implementation(op: str, backend: str) -> Callable:
    """The registered implementation, without any probe: the ahead-of-time compile check
    (tests/support/triton_compile.py) calls the triton backend on CPU tensors with the
    interpreter off, which its device probe would refuse."""
    if (op, backend) not in _REGISTRY:
        raise BackendUnavailableError(_why_not_device(op, backend, None))
    return _REGISTRY[(op, backend)].fn


def _why_not_device(op: str, backend: str, device: torch.device | None) -> str | None:
    entry = _REGISTRY.get((op, backend))
    if entry is None:
        return _UNAVAILABLE.get(backend, f"no {backend} implementation of {op} is registered")
    return None if device is None else entry.why_not_device(device)


def _why_not(op: str, backend: str, inputs) -> str | None:
    reason = _why_not_device(op, backend, inputs.device)
    if reason is None:
        probe = _REGISTRY[(op, backend)].why_not_inputs
        reason = None if probe is None else probe(inputs)
    return reason


def resolve(op: str, backend: str, inputs) -> tuple[str, Callable]:
    """(backend name, implementation) of `op` that runs `inputs` (validation's record of the
    arguments, with a .device) for the user's `backend=`."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        reasons = []
        for name in AUTO_ORDER.get(inputs.device.type, AUTO_ORDER["cpu"])[op]:
            reason = _why_not(op, name, inputs)
            if reason is None:
                return name, _REGISTRY[(op, name)].fn
            reasons.append(f"{name}: {reason}")
        raise BackendUnavailableError(f"no backend of {op} can run these inputs on "
                                      f"{inputs.device} ({'; '.join(reasons)})")
    reason = _why_not(op, backend, inputs)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op} here: {reason}")
    return backend, _REGISTRY[(op, backend)].fn


def _check_names(backend: str | None, op: str | None) -> None:
    """An unknown backend or op name is a ValueError, as in resolve (not a reason string)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {OPS} or None, got {op!r}")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def why_unavailable(backend: str, op: str | None = None, device: torch.device | str | None = None) -> str | None:
    """Why `backend` cannot run `op` (every op when None) on tensors of `device` (this machine's
    default device when None), or None when it can. Limits on particular inputs are checked
    call by call, not here."""
    _check_names(backend, op)
    device = _default_device() if device is None else torch.device(device)
    for name in OPS if op is None else (op,):
        reason = _why_not_device(name, backend, device)
        if reason is not None:
            return reason
    return None


def available_backends(op: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here.

    With no arguments: the backends that can run every op on this machine's default device
    (the GPU where there is one, else the CPU). `op` narrows the question to one op;
    `device` asks about tensors of that device type (whether this machine has such a
    device is not checked, so the GPU preference order can be inspected anywhere). Limits
    on particular inputs (sizes, dtypes) are not part of this answer: `auto` checks them
    call by call.
    """
    _check_names(None, op)
    return [b for b in BACKENDS if why_unavailable(b, op, device) is None]
