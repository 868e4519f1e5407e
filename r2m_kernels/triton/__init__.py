"""The `triton` backend: Triton kernels, one module per op (kernels, host code and the op's
registration side by side), each op a torch.library custom op (r2m_kernels.custom_ops).

On CUDA tensors the kernels compile for the GPU. On CPU tensors they run only in Triton's
interpreter (TRITON_INTERPRET=1, set before this package is imported), which is for tests.
Helpers the modules share live in utils.py.
"""

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from . import attention_pool, grebt, score_mix  # noqa: E402,F401  (each registers its op)
