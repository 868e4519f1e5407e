"""Build script. Everything is pure Python except the optional CUDA extension
`r2m_kernels._cuda`, built from csrc/ only where torch has CUDA and nvcc exists.

R2M_SKIP_CUDA_BUILD=1 skips the extension; R2M_CUDA_ARCHS (e.g. "8.0;9.0") picks the
architectures. Without the extension the package installs as pure Python and says so once.
"""

import glob
import os
import sys

from setuptools import setup


def _notice(msg):
    print(f"r2m: {msg}; installing pure Python (torch and triton backends only).", file=sys.stderr)


def cuda_extension_kwargs():
    if os.environ.get("R2M_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        _notice("R2M_SKIP_CUDA_BUILD is set")
        return {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        _notice("no CUDA sources in csrc/")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _notice("torch is not importable in the build environment (use --no-build-isolation)")
        return {}
    if torch.version.cuda is None:
        _notice("this torch has no CUDA")
        return {}
    if CUDA_HOME is None:
        _notice("nvcc was not found")
        return {}
    archs = os.environ.get("R2M_CUDA_ARCHS", "8.0;9.0")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
    ext = CUDAExtension(
        "r2m_kernels._cuda",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension_kwargs())
