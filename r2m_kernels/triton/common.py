"""What every op of the triton backend shares: where Triton can run (`why_not_device`), the
accumulation dtypes as Triton types (TL_ACC), and fp64 scalars passed as fp32 pairs
(split_scalar / join_scalar).

`INTERPRET` is read through this module by `why_not_device` (common.INTERPRET), so that tests
can turn the interpreter off for the probe.
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is defined; on CPU tensors the kernels can run
# only in the interpreter, which is for tests.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The kernels' ACC constexpr for each accumulation dtype (precision.accumulation_dtype).
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

_FP32_MAX = 3.4028234663852886e38


def why_not_device(device: torch.device) -> str | None:
    """None when Triton kernels can run on tensors of `device`, else the reason."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import to run "
            f"them in the interpreter on the CPU); got tensors on {device}")


def split_scalar(x: float):
    """x as two fp32-exact floats (hi, lo) with hi + lo = x to ~48 bits: Triton passes Python
    floats to kernels as fp32, which would round the fp64 math's constants."""
    # Beyond fp32's range (only an absurd eps gets there) the largest float stands in for inf,
    # which would turn eps / (std + eps) into NaN.
    x = max(-_FP32_MAX, min(_FP32_MAX, x))
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def join_scalar(hi, lo, ACC: tl.constexpr):
    """The inverse of split_scalar, in the math's dtype (fp32: just hi)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)
