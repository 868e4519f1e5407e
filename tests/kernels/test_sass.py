"""SASS of the built kernels: every 16-byte (VEC > 1) instantiation of the cuda pool kernels
loads with 128-bit LDGs, and no cuda kernel uses local memory (LDL/STL). The Triton kernels
compiled into the Triton cache are reported, not checked.

The gpu test reads the built extension r2m_kernels/_cuda*.so and $TRITON_CACHE_DIR with
cuobjdump; where R2M_SASS_REPORT names a file, it writes its markdown report there
(scripts/gpu_check.sh's sass stage puts it in the summary). The parse logic is checked on
any machine with nvcc and cuobjdump, on a small probe kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.support.gpu_check import find_cuda_tool

ROOT = Path(__file__).resolve().parents[2]

# Bounds on what the check reads, so that it fits in the sass stage's ~15 s: the extension's
# listing is about 25 MB (read at most 64 MiB of it), and each Triton cubin costs one
# cuobjdump call (at most 40 of the project's cubins, the newest first).
MAX_SASS_BYTES = 64 * 2**20
MAX_TRITON_CUBINS = 40
CUOBJDUMP_TIMEOUT_S = 60

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "/*0070*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> "LDG.E.128"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
# The cuda pool kernels: template <typename T, int VEC, ...>; VEC > 1 is the 16-byte path.
_POOL_KERNEL = re.compile(r"(pool_(?:forward|backward)_kernel)I(f|6__half|13__nv_bfloat16)Li(\d+)E")
# "...19pool_forward_kernelI13__nv_bfloat16Li8ELi1ELi8EE...": a length-prefixed name, then the
# template arguments (a type, then integers and bools).
_TEMPLATE = re.compile(r"(\w+_kernel)I(f|d|6__half|13__nv_bfloat16)((?:L[ib]\d+E)*)")
_TYPE_NAMES = {"f": "fp32", "d": "fp64", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {function: [opcode with modifiers, ...]}."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            current = functions.setdefault(match.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            current.append(match.group(1))
    return functions


def load_counts(opcodes: list[str]) -> dict[str, int]:
    base = [op.split(".")[0] for op in opcodes]
    return {
        "ldg128": sum(1 for op in opcodes if op.startswith("LDG.") and ".128" in op),
        "ldg": base.count("LDG"),
        "local": base.count("LDL") + base.count("STL"),
    }


def readable_name(mangled: str) -> str:
    """`pool_forward_kernel<bf16, 8, 1, 8>` for a mangled template kernel; others unchanged."""
    match = _TEMPLATE.search(mangled)
    if not match:
        return mangled
    prefixed = match.group(1)  # e.g. "...cu_9362dd5f19pool_forward_kernel": find the length prefix
    name = next((prefixed[m.end():] for m in re.finditer(r"\d+", prefixed)
                 if int(m.group()) == len(prefixed) - m.end()), prefixed)
    values = re.findall(r"L[ib](\d+)E", match.group(3))
    return f"{name}<{', '.join([_TYPE_NAMES[match.group(2)], *values])}>"


def check_extension_sass(functions: dict[str, list[str]]) -> tuple[list[tuple], list[str]]:
    """Rows (name, ldg128, other ldg, local, verdict) and the failures: every 16-byte (VEC > 1)
    instantiation of the pool kernels must load with 128-bit LDGs; no function may use local
    memory (LDL/STL)."""
    rows, failures = [], []
    for mangled, opcodes in sorted(functions.items(), key=lambda kv: readable_name(kv[0])):
        counts = load_counts(opcodes)
        name = readable_name(mangled)
        problems = []
        pool = _POOL_KERNEL.search(mangled)
        if pool and int(pool.group(3)) > 1 and counts["ldg128"] == 0:
            problems.append("no 128-bit loads on the 16-byte path")
        if counts["local"]:
            problems.append(f"{counts['local']} local-memory instructions")
        failures += [f"{name}: {p}" for p in problems]
        rows.append((name, counts["ldg128"], counts["ldg"] - counts["ldg128"], counts["local"],
                     "; ".join(problems) or "ok"))
    return rows, failures


def sass_of(cuobjdump: str, path: Path) -> str:
    """`cuobjdump -sass path`, at most MAX_SASS_BYTES of it."""
    with subprocess.Popen([cuobjdump, "-sass", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            data = proc.stdout.read(MAX_SASS_BYTES)
            if proc.stdout.read(1):
                proc.kill()
                raise RuntimeError(f"cuobjdump -sass {path}: listing over {MAX_SASS_BYTES} bytes")
            proc.wait(timeout=CUOBJDUMP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            raise RuntimeError(f"cuobjdump -sass {path} failed: {proc.stderr.read().decode(errors='replace').strip()}")
    return data.decode(errors="replace")


def triton_kernel_names() -> set[str]:
    """Functions defined in the project's Triton sources, to tell its cubins from inductor's."""
    names = set()
    for source in [*ROOT.glob("r2m_kernels/triton/*.py"), *ROOT.glob("r2m/bench/*.py")]:
        names.update(re.findall(r"^def (\w+)\(", source.read_text(), flags=re.M))
    return names


def triton_report(cuobjdump: str, cache: Path) -> list[str]:
    ours = triton_kernel_names()
    cubins = sorted((c for c in cache.rglob("*.cubin") if c.stem in ours), key=lambda c: -c.stat().st_mtime)
    lines, per_kernel = [], {}
    for cubin in cubins[:MAX_TRITON_CUBINS]:
        try:
            for opcodes in parse_sass(sass_of(cuobjdump, cubin)).values():
                counts = load_counts(opcodes)
                tally = per_kernel.setdefault(cubin.stem, Counter())
                tally["cubins"] += 1
                tally["with 128-bit loads"] += counts["ldg128"] > 0
                tally["with local memory"] += counts["local"] > 0
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            lines.append(f"- {cubin}: {exc}")
    skipped = f" ({len(cubins) - MAX_TRITON_CUBINS} older ones not read)" if len(cubins) > MAX_TRITON_CUBINS else ""
    lines += [f"Triton kernels (reported, not checked): {min(len(cubins), MAX_TRITON_CUBINS)} compiled "
              f"specialisations in the Triton cache{skipped}.", "",
              "| kernel | cubins | with 128-bit loads | with local memory |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t['cubins']} | {t['with 128-bit loads']} | {t['with local memory']} |"
              for k, t in sorted(per_kernel.items())] or ["| (none found) | | | |"]
    return lines


def _extension() -> Path | None:
    found = sorted(ROOT.glob("r2m_kernels/_cuda*.so"))
    if found:
        return found[0]
    try:
        import r2m_kernels._cuda as ext
    except ImportError:
        return None
    return Path(ext.__file__)


@pytest.mark.gpu
def test_cuda_extension_sass():
    cuobjdump = find_cuda_tool("cuobjdump")
    assert cuobjdump, "cuobjdump not found on PATH, in the CUDA toolkit or in Triton's package"
    extension = _extension()
    assert extension, "no built extension r2m_kernels._cuda"
    functions = parse_sass(sass_of(cuobjdump, extension))
    rows, failures = check_extension_sass(functions)
    if not functions:
        failures = [f"no functions in the SASS of {extension}"]
    lines = [f"cuda extension `{extension.name}`, {len(functions)} kernels (`cuobjdump -sass`, {cuobjdump}). "
             "Checked: 128-bit loads (LDG.*.128) in every 16-byte instantiation of the pool kernels, "
             "no local memory (LDL/STL) anywhere.", "",
             "| kernel | 128-bit LDG | other LDG | LDL+STL | check |", "|---|---|---|---|---|"]
    lines += [f"| `{name}` | {a} | {b} | {c} | {verdict} |" for name, a, b, c, verdict in rows]
    lines += ["", f"**{'FAIL' if failures else 'PASS'}**" + (": " + "; ".join(failures) if failures else ""), ""]
    cache = os.environ.get("TRITON_CACHE_DIR")
    if cache and Path(cache).is_dir():
        lines += triton_report(cuobjdump, Path(cache))
    if os.environ.get("R2M_SASS_REPORT"):
        Path(os.environ["R2M_SASS_REPORT"]).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert not failures, failures


SASS_PROBE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
template <typename T, int VEC>
__global__ void pool_forward_kernel(const float4* in, float* out, int k) {
  if (VEC > 1) {  // one 16-byte load
    float4 v = in[threadIdx.x];
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
  } else {  // a register array written and read at run-time indices: local memory
    float a[256];
    for (int i = 0; i < 256; ++i) a[(i * k) & 255] = out[i];
    out[threadIdx.x] = a[k & 255];
  }
}
// A 16-byte instantiation that loads 4 bytes at a time.
template <typename T, int VEC>
__global__ void pool_backward_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }
template __global__ void pool_forward_kernel<__nv_bfloat16, 8>(const float4*, float*, int);
template __global__ void pool_forward_kernel<__nv_bfloat16, 1>(const float4*, float*, int);
template __global__ void pool_forward_kernel<float, 4>(const float4*, float*, int);
template __global__ void pool_backward_kernel<__half, 8>(const float*, float*);
"""


@pytest.mark.skipif(shutil.which("nvcc") is None or find_cuda_tool("cuobjdump") is None,
                    reason="needs nvcc and cuobjdump")
def test_sass_check_finds_128_bit_loads_and_local_memory(tmp_path):
    source = tmp_path / "probe.cu"
    source.write_text(SASS_PROBE)
    subprocess.run(["nvcc", "-cubin", "-gencode", "arch=compute_90,code=sm_90", "-O3", "-o",
                    str(tmp_path / "probe.cubin"), str(source)], check=True, capture_output=True, timeout=120)
    text = sass_of(find_cuda_tool("cuobjdump"), tmp_path / "probe.cubin")
    rows, failures = check_extension_sass(parse_sass(text))
    counts = {name: (ldg128, local) for name, ldg128, _, local, _ in rows}
    assert counts["pool_forward_kernel<bf16, 8>"] == (1, 0)
    assert counts["pool_forward_kernel<fp32, 4>"] == (1, 0)
    scalar_ldg128, scalar_local = counts["pool_forward_kernel<bf16, 1>"]
    assert scalar_ldg128 == 0 and scalar_local > 0
    assert failures == ["pool_backward_kernel<fp16, 8>: no 128-bit loads on the 16-byte path",
                        f"pool_forward_kernel<bf16, 1>: {scalar_local} local-memory instructions"]


CANNED = """
	code for sm_90
		Function : _Z19pool_forward_kernelI13__nv_bfloat16Li8EEvPK6float4Pfi
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0070*/               @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
		Function : _Z19pool_forward_kernelI13__nv_bfloat16Li1EEvPK6float4Pfi
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   STL [R1], R4 ;
        /*0030*/                   LDL R5, [R1] ;
"""


def test_sass_parse_on_a_canned_listing():
    """The parse and the verdicts on the CPU, from a listing in cuobjdump's format."""
    rows, failures = check_extension_sass(parse_sass(CANNED))
    counts = {name: (ldg128, other, local) for name, ldg128, other, local, _ in rows}
    assert counts == {"pool_forward_kernel<bf16, 8>": (1, 0, 0), "pool_forward_kernel<bf16, 1>": (0, 1, 2)}
    assert failures == ["pool_forward_kernel<bf16, 1>: 2 local-memory instructions"]
