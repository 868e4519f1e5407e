"""Build script. Everything is pure Python except the optional CUDA extension
`r2m_kernels._cuda`, built from csrc/ only where torch has CUDA and nvcc exists.

R2M_SKIP_CUDA_BUILD=1 skips the extension; R2M_CUDA_ARCHS (e.g. "8.0;9.0") picks the
architectures; R2M_CUDA_DEBUG=1 keeps host debug info. Objects go to build/cuda/ in the source
tree, so rebuilding the same tree is incremental. Without the extension the package installs as
pure Python and says so once.
Sources and flags: r2m_kernels/cuda/build.py (the JIT fallback uses the same).
"""

import os
import runpy
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD = runpy.run_path(os.path.join(ROOT, "r2m_kernels", "cuda", "build.py"))


def _notice(msg):
    print(f"r2m: {msg}; installing pure Python (torch and triton backends only).", file=sys.stderr)


def cuda_extension_kwargs():
    if os.environ.get("R2M_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        _notice("R2M_SKIP_CUDA_BUILD is set")
        return {}
    sources = [os.path.relpath(s, ROOT) for s in BUILD["sources"](ROOT)]
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
    archs = BUILD["archs"]()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"r2m: building the CUDA extension r2m_kernels._cuda for {archs}", file=sys.stderr)
    ext = CUDAExtension(
        "r2m_kernels._cuda",
        sources,
        include_dirs=[BUILD["csrc_dir"](ROOT)],
        extra_compile_args={"cxx": BUILD["CXX_FLAGS"], "nvcc": BUILD["NVCC_FLAGS"]},
    )
    base = BuildExtension.with_options(use_ninja=True)

    class BuildInTree(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, BUILD["BUILD_TEMP"])

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildInTree}}


setup(**cuda_extension_kwargs())
