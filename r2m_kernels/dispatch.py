"""The one place that picks a backend for an op.

A backend registers one implementation per op together with a probe that says whether it
can run on a given device. `resolve` turns the user's `backend=` into an implementation: an
explicit name that cannot run here raises BackendUnavailableError (never a silent
fallback); "auto" takes the first backend in AUTO_ORDER that can run on the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda")
OPS = ("attention_pool", "grebt_loss", "score_mix")

# Preference of "auto" per device type. The plain-PyTorch reference is the CPU default: the
# Triton interpreter is for testing, not speed. On a GPU, triton comes before cuda until the
# benchmark suite has measured the cuda kernels faster there (benchmarks/RESULTS.md).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for these inputs on this machine."""


@dataclass(frozen=True)
class _Entry:
    fn: Callable
    why_not: Callable[[torch.device], str | None]  # None when it can run on that device


_REGISTRY: dict[tuple[str, str], _Entry] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it could not even be imported


def register(op: str, backend: str, fn: Callable, why_not: Callable[[torch.device], str | None]):
    assert op in OPS and backend in BACKENDS, (op, backend)
    _REGISTRY[(op, backend)] = _Entry(fn, why_not)


def mark_unavailable(backend: str, reason: str) -> None:
    _UNAVAILABLE[backend] = reason


def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    entry = _REGISTRY.get((op, backend))
    if entry is None:
        return _UNAVAILABLE.get(backend, f"no {backend} implementation of {op} is registered")
    return entry.why_not(device)


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Return (backend name, implementation) of `op` for tensors on `device`."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if _why_not(op, name, device) is None:
                return name, _REGISTRY[(op, name)].fn
        raise BackendUnavailableError(f"no backend of {op} can run on {device}")
    reason = _why_not(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op} on {device}: {reason}")
    return backend, _REGISTRY[(op, backend)].fn


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(op: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here.

    With no arguments: the backends that can run every op on this machine's default device
    (the GPU where there is one, else the CPU). `op` narrows the question to one op;
    `device` asks about tensors of that device type (whether this machine has such a
    device is not checked, so the GPU preference order can be inspected anywhere).
    """
    device = _default_device() if device is None else torch.device(device)
    ops = OPS if op is None else (op,)
    return [b for b in BACKENDS if all(_why_not(o, b, device) is None for o in ops)]
