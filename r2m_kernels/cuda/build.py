"""How the extension r2m_kernels._cuda is compiled: read by setup.py (with runpy, before the
package is importable) and by the development JIT fallback in __init__.py, so that both
build the same sources with the same flags. No imports beyond the standard library."""

import glob
import os

# Architectures when R2M_CUDA_ARCHS is not set: Ampere (A100) and Hopper (H100/H200).
DEFAULT_ARCHS = "8.0;9.0"
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def csrc_dir(repo_root: str) -> str:
    return os.path.join(repo_root, "csrc")


def sources(repo_root: str) -> list:
    """Every .cu and .cpp file of csrc/, sorted (absolute paths)."""
    root = csrc_dir(repo_root)
    return sorted(glob.glob(os.path.join(root, "*.cu")) + glob.glob(os.path.join(root, "*.cpp")))


def archs() -> str:
    return os.environ.get("R2M_CUDA_ARCHS", DEFAULT_ARCHS)
