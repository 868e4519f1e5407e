"""The `triton` backend: Triton kernels, one module per op, each a torch.library custom op with
its autograd (so torch.compile keeps it as one node).

On CUDA tensors the kernels compile for the GPU. On CPU tensors they run only in Triton's
interpreter (TRITON_INTERPRET=1, set before this package is imported), which is for tests.
"""

import os

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The kernels' ACC constexpr for each accumulation dtype (reference.accumulation_dtype).
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def why_not(device) -> str | None:
    """None when Triton kernels can run on tensors of `device`, else the reason."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import to run "
            f"them in the interpreter on the CPU); got tensors on {device}")


from . import grebt  # noqa: E402,F401  (registers grebt_loss)
from . import score_mix  # noqa: E402,F401  (registers score_mix)
from . import attention_pool  # noqa: F401,E402  (registers the op with dispatch)
