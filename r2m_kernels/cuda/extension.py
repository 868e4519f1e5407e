"""Loading the extension r2m_kernels._cuda that the `cuda` backend's ops call, and the backend's
device probe.

`pip install` builds the extension where torch has CUDA and nvcc exists. In a source checkout
without a prebuilt module, the first use on a CUDA tensor JIT-builds the same sources with
torch.utils.cpp_extension.load (R2M_CUDA_JIT=0 turns that off). The backend is available only
where the module imports and the tensors are on a GPU; otherwise `why_not_device` says why.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from .. import dispatch
from . import build

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Unavailable(Exception):
    pass


def _jit_build(prebuilt_error: ImportError):
    if not build.sources(_REPO_ROOT):
        raise _Unavailable(f"the extension r2m_kernels._cuda is not installed ({prebuilt_error}); "
                           "reinstall r2m on a machine with nvcc and a CUDA build of torch")
    if os.environ.get("R2M_CUDA_JIT", "1") == "0":
        raise _Unavailable("r2m_kernels._cuda is not built and R2M_CUDA_JIT=0 turns off the JIT build")
    if torch.version.cuda is None:
        raise _Unavailable("r2m_kernels._cuda is not built and this torch has no CUDA to build it")
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise _Unavailable("r2m_kernels._cuda is not built and nvcc was not found to build it")
    print("r2m: building the CUDA extension from csrc/ (first use only, about a minute)...",
          file=sys.stderr)
    try:
        return load(name="r2m_kernels_cuda_jit", sources=build.sources(_REPO_ROOT),
                    extra_include_paths=[build.csrc_dir(_REPO_ROOT)],
                    extra_cflags=build.CXX_FLAGS, extra_cuda_cflags=build.NVCC_FLAGS)
    except Exception as exc:  # a compiler error is reported as the reason, not raised at import
        raise _Unavailable(f"the JIT build of csrc/ failed: {exc}") from exc


@functools.cache
def _load():
    """(module, None) or (None, why it cannot be had). Tried once per process."""
    try:
        from .. import _cuda
        return _cuda, None
    except ImportError as exc:
        try:
            return _jit_build(exc), None
        except _Unavailable as why:
            return None, str(why)


def module():
    """The compiled extension (call only after why_not_device said yes)."""
    ext, why = _load()
    if ext is None:
        raise dispatch.BackendUnavailableError(f"backend='cuda' is unavailable: {why}")
    return ext


def why_not_device(device) -> str | None:
    """None when the CUDA kernels can run on tensors of `device`, else the reason."""
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors; got tensors on {device}"
    return _load()[1]
