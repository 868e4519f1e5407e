"""The `cuda` backend (csrc/ + r2m_kernels/cuda/).

Everywhere: every .cu file compiles with nvcc for the default architectures (sm_80, sm_90)
and binding.cpp compiles against torch's headers, so a kernel that does not build cannot
land; CPU tensors get a clear error; and the host side (scale folding, flash-decoding
combine, dq scaling, autograd, reductions) is checked against float64 with a plain-PyTorch
model of the launchers' contract (tests/cuda_contract.py) standing in for the kernels.
On a GPU (`gpu` tests): the compiled kernels against float64 and against triton.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import r2m_kernels
from r2m import R2MHead
from r2m_kernels import BackendUnavailableError, splits
from r2m_kernels.cuda import attention_pool as cuda_pool
from r2m_kernels.cuda import build
from r2m_kernels.cuda import grebt as cuda_grebt
from r2m_kernels.reference import attention_pool_torch, grebt_loss_torch
from r2m_kernels.validation import validate_attention_pool

from .cuda_contract import FakeExtension
from .inputs import make_mask, pack
from .pool_checks import GPU_DTYPES, HIDDEN_GRADS, check_against_reference, make_inputs, pool_and_grads

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
CU_FILES = sorted((ROOT / "csrc").glob("*.cu"))


# --- the sources build --------------------------------------------------------------------

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


# --- clear errors off the GPU -------------------------------------------------------------

def test_cpu_tensors_get_a_clear_error():
    hidden, q = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors; got tensors on cpu"):
        r2m_kernels.attention_pool(hidden, q, 0.5, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        r2m_kernels.grebt_loss(torch.randn(8), 4, backend="cuda")
    head = R2MHead(8, 8, attn_dim=4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        head(torch.randn(2, 8), hidden, omega=0.5)
    assert "cuda" not in r2m_kernels.available_backends(device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_why_not_on_a_cuda_device_says_what_is_missing():
    reason = r2m_kernels.why_unavailable("cuda", "attention_pool", "cuda")
    assert reason and "r2m_kernels._cuda" in reason


def test_unsupported_dtypes_and_sizes_are_named():
    def reason(hidden, q):
        return cuda_pool.why_not_inputs(validate_attention_pool(hidden, q, 1.0, None, None))

    assert "float64" in reason(torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 4))
    assert "n_h <= 64" in reason(torch.zeros(1, 2, 4), torch.zeros(1, 65, 4))
    assert "D_p <= 16384" in reason(torch.zeros(1, 2, 16385), torch.zeros(1, 1, 16385))
    assert reason(torch.zeros(1, 2, 16384, dtype=torch.bfloat16), torch.zeros(1, 64, 16384)) is None


# --- the host side against the launchers' contract ------------------------------------------

@pytest.fixture
def fake_extension(monkeypatch):
    fake = FakeExtension()
    monkeypatch.setattr(cuda_pool, "module", lambda: fake)
    monkeypatch.setattr(cuda_grebt, "module", lambda: fake)
    return fake


@pytest.mark.parametrize("layout", ["holes", "left", "packed"])
@pytest.mark.parametrize("n_split", [1, 3])
def test_host_side_matches_float64(layout, n_split, fake_extension, monkeypatch):
    monkeypatch.setattr(splits, "num_splits", lambda programs, seq_len, device: n_split)
    batch, seq_len, d_p, heads, scale = 3, 40, 6, 2, 0.7  # 3 splits: chunks of 16, 16, 8
    mask = make_mask(batch, seq_len, "holes" if layout == "holes" else "left")
    hidden64 = torch.randn(batch, seq_len, d_p, dtype=torch.float64)
    cu_seqlens = None
    if layout == "packed":
        hidden64, cu_seqlens = pack(hidden64, mask)
        mask = None
    q64 = torch.randn(batch, heads, d_p, dtype=torch.float64)
    grad = torch.randn(batch, heads, d_p, dtype=torch.float64)

    def run(fn, hidden, q):
        hidden, q = hidden.clone().requires_grad_(), q.clone().requires_grad_()
        pooled = fn(hidden, q)
        pooled.backward(grad.to(pooled.dtype))
        return pooled, q.grad, hidden.grad

    ref = run(lambda h, q: attention_pool_torch(h, q, scale, mask, cu_seqlens), hidden64, q64)
    got = run(lambda h, q: cuda_pool._pool_op(h, q, scale, mask, cu_seqlens)[0],
              hidden64.float(), q64.float())
    for name, g, r in zip(("pooled", "dq", "dhidden"), got, ref):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)
    assert fake_extension.calls == [("attention_pool_forward", n_split),
                                    ("attention_pool_backward", n_split)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grebt_host_side_matches_float64(reduction, fake_extension):
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    for kwargs in ({"group_size": 4}, {"cu_groups": cu}):
        n = 12 if "group_size" in kwargs else 9
        r64 = torch.randn(n, dtype=torch.float64, requires_grad=True)
        r32 = r64.detach().float().requires_grad_()
        size = kwargs.get("group_size")
        ref = grebt_loss_torch(r64, size, kwargs.get("cu_groups"), 0.3, 1e-6, reduction)
        got = cuda_grebt._grebt_op(r32, size, kwargs.get("cu_groups"), None, 0.3, 1e-6, reduction, True)[0]
        grad_out = torch.randn(ref.shape, dtype=torch.float64)
        ref.backward(grad_out)
        got.backward(grad_out.float())
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r32.grad.double(), r64.grad, rtol=1e-4, atol=1e-6)


# --- the compiled kernels, on a GPU -----------------------------------------------------------
# GREBT's cuda cases run in tests/test_grebt_kernels.py (every test there takes `backend`).

# (kind, B, S, D_p, n_h): the vector path (D_p % 8 == 0) and the scalar one (odd D_p), each
# column count the launcher picks (D_p <= 2048, <= 8192, <= 16384), S = 1, many heads, and
# long sequences that take the flash-decoding split.
GPU_CASES = [
    ("dense", 64, 1024, 4096, 1),
    ("holes", 8, 1000, 1000, 3),
    ("left", 4, 777, 4099, 1),
    ("packed", 16, 1024, 2048, 16),
    ("holes", 2, 32768, 4096, 1),
    ("dense", 3, 1, 37, 2),
    ("packed", 5, 600, 16384, 1),
    ("left", 6, 300, 12000, 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,batch,seq_len,d_p,heads", GPU_CASES)
@GPU_DTYPES
@HIDDEN_GRADS
def test_gpu_pool_matches_float64(kind, batch, seq_len, d_p, heads, dtype, hidden_grad):
    check_against_reference(kind, batch, seq_len, d_p, heads, dtype, torch.float32, hidden_grad,
                            device="cuda", nan_pads=True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n_split", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_pool_matches_triton(n_split, dtype, monkeypatch):
    """The two compiled backends agree on the same inputs, forcing the number of splits of
    the cuda kernels (each backend is also held to float64 above)."""
    monkeypatch.setattr(splits, "num_splits", lambda programs, seq_len, device: n_split)
    hidden, q, mask, cu = make_inputs("holes", 6, 700, 2048, 4, "cuda")
    grad = torch.randn(6, 4, 2048, dtype=torch.float64, device="cuda")
    low = (hidden.to(dtype), q.float())
    got = pool_and_grads("cuda", *low, 0.05, mask, cu, grad, True)
    want = pool_and_grads("triton", *low, 0.05, mask, cu, grad, True)
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    for name, g, w in zip(("pooled", "dq", "dhidden"), got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.gpu
def test_gpu_pool_unaligned_rows_and_poisoned_outputs():
    """Rows whose stride is not a multiple of 16 bytes take the scalar path; every output the
    kernels write comes from freed memory first filled with NaN (the caching allocator hands
    it out again), so a position they skip shows up as NaN."""
    wide = torch.randn(4, 300, 2056, dtype=torch.float64, device="cuda")
    hidden64 = wide[..., :2051]  # row stride 2056, last dim contiguous
    q64 = torch.randn(4, 2, 2051, dtype=torch.float64, device="cuda")
    grad = torch.randn(4, 2, 2051, dtype=torch.float64, device="cuda")
    ref = pool_and_grads("torch", hidden64, q64, 0.03, None, None, grad, True)
    torch.full((1 << 26,), float("nan"), device="cuda")  # freed at once, memory stays cached
    got = pool_and_grads("cuda", hidden64.to(torch.bfloat16), q64.float(), 0.03, None, None, grad, True)
    for name, g, r in zip(("pooled", "dq", "dhidden"), got, ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.gpu
def test_gpu_custom_op_and_head():
    hidden, q, mask, _ = make_inputs("holes", 3, 50, 64, 2, "cuda")
    hidden, q = hidden.float().requires_grad_(), q.float().requires_grad_()
    torch.library.opcheck(cuda_pool._pool_op, (hidden, q, 0.5, mask, None))
    rewards = torch.randn(24, device="cuda", requires_grad=True)
    torch.library.opcheck(cuda_grebt._grebt_op, (rewards, 8, None, 0.3, 1e-6, "mean", True))
    fast = R2MHead(40, 24, attn_dim=16, num_heads=2, backend="cuda").cuda()
    ref = R2MHead(40, 24, attn_dim=16, num_heads=2, backend="torch").cuda()
    ref.load_state_dict(fast.state_dict())
    rte, h = torch.randn(3, 40, device="cuda"), torch.randn(3, 50, 24, device="cuda")
    for head in (fast, ref):
        head(rte, h, mask=mask, omega=0.4).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert "cuda" in r2m_kernels.available_backends()
