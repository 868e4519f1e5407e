"""The `cuda` backend: CUDA C++ kernels from csrc/, compiled into r2m_kernels._cuda, one module
per op (host code and the op's registration); extension.py loads (or JIT-builds) the extension,
build.py says how it is compiled.
"""

from . import attention_pool, grebt, score_mix  # noqa: F401  (each registers its op)
