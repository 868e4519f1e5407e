"""How the extension r2m_kernels._cuda is compiled: read by setup.py (with runpy, before the
package is importable) and by the development JIT fallback in extension.py, so that both
build the same sources with the same flags. No imports beyond the standard library."""

import glob
import os

# Architectures when R2M_CUDA_ARCHS is not set: Ampere (A100) and Hopper (H100/H200).
DEFAULT_ARCHS = "8.0;9.0"
# -g0 after Python's own -g: debug info for binding.cpp (torch's headers) took 46 s of its 79 s
# compile and made the .so 18 MB; R2M_CUDA_DEBUG=1 keeps it. -lineinfo (source lines in the SASS,
# for compute-sanitizer and ncu) costs little.
CXX_FLAGS = ["-O3"] + ([] if os.environ.get("R2M_CUDA_DEBUG", "0") not in ("", "0") else ["-g0"])
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
# Object files live here (inside the working tree, git-ignored) rather than in pip's temporary
# build folder, so that a second build of the same tree recompiles only what changed (ninja).
BUILD_TEMP = os.path.join("build", "cuda")


def csrc_dir(repo_root: str) -> str:
    return os.path.join(repo_root, "csrc")


def sources(repo_root: str) -> list:
    """Every .cu and .cpp file of csrc/, sorted (absolute paths)."""
    root = csrc_dir(repo_root)
    return sorted(glob.glob(os.path.join(root, "*.cu")) + glob.glob(os.path.join(root, "*.cpp")))


def archs() -> str:
    return os.environ.get("R2M_CUDA_ARCHS", DEFAULT_ARCHS)
