"""The cuda backend's sources build (docs/design.md §5): every .cu file compiles with nvcc for
the default architectures (sm_80, sm_90) without register spills, and binding.cpp compiles
against torch's headers, so a kernel that does not build cannot land. No GPU needed."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from r2m_kernels.cuda import build

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
CU_FILES = sorted((ROOT / "csrc").glob("*.cu"))


def test_csrc_has_the_kernels_and_binding():
    names = {p.name for p in ROOT.joinpath("csrc").iterdir()}
    assert {"attention_pool.cu", "grebt.cu", "binding.cpp", "r2m_cuda.h"} <= names
    assert [Path(s).name for s in build.sources(str(ROOT))] == sorted(
        n for n in names if n.endswith((".cu", ".cpp")))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles(cu_file, tmp_path):
    """Compile only (no GPU needed), for every default architecture, with the build's flags;
    ptxas must not spill registers to local memory (a silent slow path)."""
    arches = [a.replace(".", "") for a in build.DEFAULT_ARCHS.split(";")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    cmd = [NVCC, "-std=c++17", *build.NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-Xcompiler", "-Wall",
           f"-I{ROOT / 'csrc'}", "-c", str(cu_file), "-o", str(tmp_path / "out.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    spills = [line for line in done.stderr.splitlines()
              if "spill" in line and not line.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, "\n".join(spills)


def _torch_cuda_includes(tmp_path: Path) -> list[str]:
    """Include paths for compiling against torch's CUDA headers. A CPU build of torch ships
    them without the generated c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is enough
    for a syntax check."""
    from torch.utils.cpp_extension import include_paths

    paths = include_paths() + [sysconfig.get_paths()["include"]]
    cuda_includes = [Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")]
    paths += [str(p) for p in cuda_includes if (p / "cuda_runtime_api.h").exists()][:1]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in paths):
        (tmp_path / macros).parent.mkdir(parents=True)
        (tmp_path / macros).write_text("#pragma once\n")
        paths.append(str(tmp_path))
    return paths


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs nvcc's headers and g++")
def test_binding_compiles_against_torch_headers(tmp_path):
    # torch's headers need C++20 from 2.10 on (TorchVersion compares numerically).
    flags = ["-std=c++20" if torch.__version__ >= (2, 10) else "-std=c++17", "-fsyntax-only",
             "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=_cuda", f"-I{ROOT / 'csrc'}"]
    cmd = ["g++", *flags, *(f"-isystem{p}" for p in _torch_cuda_includes(tmp_path)),
           str(ROOT / "csrc" / "binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-4000:]
