"""Timing, peak memory and memory bandwidth for the benchmark.

GPU: triton.testing.do_bench medians (it flushes the L2 cache before every call), and
torch.cuda's peak-memory counters. CPU: the median of a wall-clock loop after warm-up, and
no memory figure (the CPU allocator keeps no peak counter; reported as n/a).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@dataclass(frozen=True)
class Timer:
    """Median time of a call in milliseconds.

    `median_ms`: on CUDA, do_bench with warmup_ms / rep_ms; on the CPU the same budgets drive
    a wall-clock loop (calls for about warmup_ms untimed, then for about rep_ms timed, at
    least MIN_REPS). `wall_median_ms`: `warmup` untimed calls then `reps` timed ones, for calls
    that take seconds, where do_bench's own estimate runs would cost minutes.
    """

    device: torch.device
    warmup_ms: float = 25
    rep_ms: float = 100
    warmup: int = 1
    reps: int = 3

    MIN_REPS = 5
    MAX_REPS = 1000

    def median_ms(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                  grad_to_none=list(grad_to_none) or None, return_mode="median"))
        estimate = self._times(fn, grad_to_none, 1)[0]
        warmup = int(min(self.MAX_REPS, self.warmup_ms // max(estimate, 1e-3)))
        reps = int(min(self.MAX_REPS, max(self.MIN_REPS, self.rep_ms // max(estimate, 1e-3))))
        self._times(fn, grad_to_none, warmup)
        return statistics.median(self._times(fn, grad_to_none, reps))

    def wall_median_ms(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
        self._times(fn, grad_to_none, self.warmup)
        return statistics.median(self._times(fn, grad_to_none, self.reps))

    def _times(self, fn, grad_to_none, calls: int) -> list[float]:
        synchronize(self.device)
        times = []
        for _ in range(calls):
            _clear_grads(grad_to_none)
            start = time.perf_counter()
            fn()
            synchronize(self.device)
            times.append((time.perf_counter() - start) * 1e3)
        return times


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, int | None]:
    """(peak extra bytes, peak total bytes) allocated while `fn` runs once on a CUDA device:
    extra is above what was allocated before the call (inputs, weights, optimizer state),
    total includes it. (None, None) on the CPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before, peak


@dataclass(frozen=True)
class Bandwidth:
    """Measured memory bandwidths in bytes per second. `read` sets the floor; `read_method`
    says how it was measured."""

    read: float
    read_method: str
    torch_sum: float
    copy: float  # bytes read plus bytes written, per second
    buffer_bytes: int

    def floor_ms(self, nbytes: int, passes: int) -> float:
        """The least time to read `nbytes` `passes` times at the read bandwidth."""
        return passes * nbytes / self.read * 1e3

    def as_dict(self) -> dict:
        return {"read_bytes_per_s": self.read, "read_method": self.read_method,
                "torch_sum_bytes_per_s": self.torch_sum, "copy_bytes_per_s": self.copy,
                "buffer_bytes": self.buffer_bytes}


def measure_bandwidth(device: torch.device, timer: Timer, buffer_bytes: int) -> Bandwidth:
    """Read-only bandwidth (a plain Triton read loop on the GPU, torch.sum on the CPU), the
    torch.sum read bandwidth and the copy bandwidth, on a buffer of `buffer_bytes`."""
    numel = buffer_bytes // 4
    x = torch.rand(numel, device=device, dtype=torch.float32)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    sum_bw = nbytes / (timer.median_ms(lambda: x.sum()) * 1e-3)
    copy_bw = 2 * nbytes / (timer.median_ms(lambda: y.copy_(x)) * 1e-3)
    if device.type == "cuda":
        from .read_kernel import read_sum, read_sum_partials_buffer

        partials = read_sum_partials_buffer(x)
        read_bw = nbytes / (timer.median_ms(lambda: read_sum(x, partials)) * 1e-3)
        method = "Triton read loop (GPU)"
    else:
        read_bw, method = sum_bw, "torch.sum (CPU)"
    return Bandwidth(read_bw, method, sum_bw, copy_bw, nbytes)
