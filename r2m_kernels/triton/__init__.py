"""The `triton` backend: Triton kernels, one module per op (kernels, host code and the op's
registration side by side), each op a torch.library custom op (r2m_kernels.custom_ops).

On CUDA tensors the kernels compile for the GPU. On CPU tensors they run only in Triton's
interpreter (TRITON_INTERPRET=1, set before this package is imported), which is for tests.
What every op shares lives in common.py; the attention pool's row layout, shared by its
two variants, in pool_layout.py.
"""

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from . import attention_pool, grebt, score_mix  # noqa: E402,F401  (each registers its op)
