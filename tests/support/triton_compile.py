"""Ahead-of-time compile check of every Triton kernel of r2m for NVIDIA GPUs, on a machine
without one (docs/design.md §5).

The triton backend's host code runs on CPU tensors (never read: the kernels do not run) while
Triton believes it drives an sm_90 (then an sm_80) GPU with 132 multiprocessors, the size of
an H100/H200, so the host makes the choices it would make there (flash-decoding splits,
autotune pruning). Every launch goes through Triton's own launcher (`JITFunction.run`: its
binder specialises pointers by 16-byte alignment and integers by divisibility by 16 and by
equality to 1) up to the point where it would compile; there the specialisation is recorded
instead. Autotuned kernels are launched once per config their pruning keeps. Each distinct
specialisation is then compiled with the installed Triton (its compiler and bundled ptxas),
and ptxas reports registers, spills and shared memory.

It fails on a compile error; on shared memory above the per-block limit; on a kernel of
r2m_kernels/triton that no case launched; and, on sm_90, on a kept config that spills to local
memory more than SPILL_BOUNDS allows its kernel (0 bytes for a kernel not listed there).

    TRITON_INTERPRET=0 python -m tests.support.triton_compile [--arch 90 --arch 80] [--report FILE]

tests/kernels/test_triton_compile.py runs it under every supported Triton (3.6 and the newest).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("tests.support.triton_compile compiles for the GPU: run it with TRITON_INTERPRET unset or 0")
os.environ["TRITON_INTERPRET"] = "0"
# A fresh Triton cache, so that every specialisation really compiles and ptxas reports on it.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="r2m-triton-compile-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import r2m_kernels  # noqa: E402
from r2m.bench.sizes import SIZES  # noqa: E402
from r2m_kernels import dispatch, splits  # noqa: E402
from r2m_kernels.triton import attention_pool, attention_pool_many_heads, grebt, score_mix  # noqa: E402

KERNEL_MODULES = (attention_pool, attention_pool_many_heads, grebt, score_mix)
MULTIPROCESSORS = 132  # H100 SXM and H200
ARCHS = (90, 80)
# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 80: 166912}
# Spill bytes (stored + loaded) a kernel may have on sm_90: each bound beside its kernel, with
# the reason such configs stay.
SPILL_BOUNDS = {"_grebt_fwd_kernel": grebt.FWD_SPILL_BYTES,
                "_pool_bwd_kernel": attention_pool.BWD_SPILL_BYTES,
                "_dscores_kernel": attention_pool_many_heads.DSCORES_SPILL_BYTES}


# --- recording launches ------------------------------------------------------------------------

@dataclass
class Spec:
    """One specialisation of one kernel for one target, as Triton's launcher built it."""
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    cases: list = field(default_factory=list)  # the cases that launched it

    def key(self):
        return (self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items(), key=repr)), repr(sorted(self.attrs.items(), key=repr)),
                repr(sorted(vars(self.options).items())))

    def meta(self) -> dict:
        """The launch's tile sizes and launch options, by name."""
        names = {(i,): name for i, name in enumerate(_KERNELS[self.kernel].arg_names)}
        block = {names.get(k, str(k)): _plain(v) for k, v in self.constexprs.items()
                 if names.get(k, "").startswith("BLOCK") or names.get(k, "") in _META}
        return {**block, "num_warps": self.options.num_warps, "num_stages": self.options.num_stages}


# Constexprs that tell specialisations of one kernel apart in reports, beside the tiles.
_META = ("ACC", "DOT", "PRECISION", "SOFTMAX", "NEED_DH", "WRITE_GRAD", "RAGGED")


def _plain(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


class _PretendGPU:
    """The driver Triton's launcher asks for the current device, stream and target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # a distinct device per target, so launcher caches never mix targets

    def get_current_stream(self, device=None):
        return 0


_KERNELS: dict[str, JITFunction] = {}
_RECORDED: dict[tuple, Spec] = {}
_CASE = {"label": "?", "every_config": True}


def _record(self, key, signature, device, constexprs, options, attrs, warmup):
    """Stands in for JITFunction._do_compile: keep the specialisation, compile nothing. The
    launcher then returns without launching."""
    spec = Spec(self.__name__, device, dict(signature), dict(constexprs), dict(attrs), options)
    spec = _RECORDED.setdefault(spec.key(), spec)
    if _CASE["label"] not in spec.cases:
        spec.cases.append(_CASE["label"])
    return None


def _launch_every_config(self, *args, **kwargs):
    """Stands in for Autotuner.run: launch once per config the pruning keeps (or the first of
    them), no benchmark."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    for config in configs if _CASE["every_config"] else configs[:1]:
        self.fn.run(*args, **kwargs, **config.all_kwargs())
    self.nargs = None


def _kernels_of(module) -> dict[str, JITFunction]:
    """The launchable kernels of a module (its `*_kernel` objects), unwrapped."""
    found = {}
    for name, obj in vars(module).items():
        if name.endswith("_kernel") and isinstance(obj, (JITFunction, Autotuner, Heuristics)):
            while not isinstance(obj, JITFunction):
                obj = obj.fn
            found[obj.__name__] = obj
    return found


# --- the cases ---------------------------------------------------------------------------------
#
# A case compiles either every config its autotuner's pruning keeps (EVERY) or only the first
# (FIRST), which covers the case's code path: layouts change addressing, not tiles; fp16 and
# fp32 hidden take bf16's tiles in the per-head kernels (they are converted to fp32 on load).
# sm_90 (H100/H200, what r2m is tuned for) gets every config of the docs/design.md §6 sizes and
# of the small odd ones in bf16, and of the many-head kernels' own fp32 tiles; sm_80 gets every
# config where its smaller shared memory could be exceeded (the many-head tiles) and each
# other code path once.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
EVERY, FIRST = True, False


def _pool_sizes():
    """(name, B, S, D_p, n_h): docs/design.md §6 sizes, then small odd ones."""
    for name in ("paper-8b", "paper-3b", "long", "heads"):
        s = SIZES[name]
        yield name, s.batch, s.seq_len, s.policy_dim, s.num_heads
    heads = SIZES["heads"]
    yield "heads-32", heads.batch, heads.seq_len, heads.policy_dim, 32
    yield "odd", 3, 37, 1000, 1            # direct, D_p not a power of two
    yield "odd-split", 2, 1000, 200, 1     # 2 programs: the flash-decoding split path
    yield "odd-heads", 5, 37, 72, 3        # per-head variant, several heads into dhidden
    yield "odd-many", 3, 45, 20, 12        # many-head variant, D_p below one tile
    yield "s1", 7, 1, 17, 1                # S = 1


# (arch, dtype, layout) -> {size: EVERY or FIRST}; a case not listed is not compiled.
_POOL_TIERS = {
    (90, "bf16", "mask"): {**dict.fromkeys(("paper-8b", "paper-3b", "heads", "heads-32", "odd", "odd-heads",
                                             "odd-many"), EVERY),
                           **dict.fromkeys(("long", "odd-split", "s1"), FIRST)},  # paper-8b's tiles, split
    (90, "fp32", "mask"): {**dict.fromkeys(("heads", "heads-32", "odd-many"), EVERY),  # their own fp32 tiles
                           **dict.fromkeys(("paper-8b", "paper-3b", "long", "odd", "odd-split", "odd-heads",
                                            "s1"), FIRST)},
    (90, "fp16", "mask"): dict.fromkeys(("paper-8b", "heads", "odd-many"), FIRST),
    (90, "fp64", "mask"): dict.fromkeys(("odd", "odd-split", "odd-heads", "s1"), FIRST),
    (90, "bf16", "packed"): dict.fromkeys(("paper-8b", "odd-split", "odd-heads", "heads", "odd-many", "s1"), FIRST),
    (90, "bf16", "dense"): dict.fromkeys(("paper-8b", "odd-split", "odd-heads", "heads", "odd-many", "s1"), FIRST),
    (80, "bf16", "mask"): {**dict.fromkeys(("heads", "odd-many"), EVERY),  # the largest shared-memory tiles
                           **dict.fromkeys(("paper-8b", "odd-split", "odd-heads"), FIRST)},
    (80, "fp32", "mask"): dict.fromkeys(("paper-8b", "heads"), FIRST),
    (80, "bf16", "packed"): dict.fromkeys(("paper-8b", "heads"), FIRST),
}


def _pool_cases(arch):
    pool = dispatch.implementation("attention_pool", "triton")
    for name, batch, seq_len, d_p, heads in _pool_sizes():
        for dtype_name in ("bf16", "fp16", "fp32", "fp64"):
            for layout in ("mask", "packed", "dense"):
                tier = _POOL_TIERS.get((arch, dtype_name, layout), {}).get(name)
                if tier is None:
                    continue
                for hidden_grad in (False, True):
                    label = f"attention_pool {name} {dtype_name} {layout} {'dq+dhidden' if hidden_grad else 'dq'}"
                    yield label, tier, _pool_call(pool, batch, seq_len, d_p, heads, DTYPES[dtype_name], layout,
                                                  hidden_grad)


def _pool_call(pool, batch, seq_len, d_p, heads, dtype, layout, hidden_grad):
    def run():
        # torch.empty: the values are never read, and the large sizes stay virtual memory.
        mask = cu_seqlens = None
        if layout == "packed":
            hidden = torch.empty(batch * seq_len, d_p, dtype=dtype)
            cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32)
        else:
            hidden = torch.empty(batch, seq_len, d_p, dtype=dtype)
            mask = torch.ones(batch, seq_len, dtype=torch.bool) if layout == "mask" else None
        hidden.requires_grad_(hidden_grad)
        q = torch.zeros(batch, heads, d_p, dtype=torch.float32, requires_grad=True)
        pooled = pool(hidden, q, d_p ** -0.5, mask=mask, cu_seqlens=cu_seqlens)
        pooled.backward(torch.zeros_like(pooled))
    return run


def _grebt_cases(arch):
    """Uniform groups of every tile width the host picks for RL-sized and large groups, ragged
    groups up to the largest, the 16384-group batch; 16-bit and fp32 rewards differ only in
    their loads (fp32 math either way), so fp32 once and fp16 not at all."""
    loss = dispatch.implementation("grebt_loss", "triton")
    shapes = [("uniform", k, 64) for k in (1, 2, 8, 37, 4096, 16384)]
    shapes += [("uniform", 8, 16384), ("ragged", 5, None), ("ragged", 16384, None)]
    for kind, k, groups in shapes:
        dtypes = ("bf16", "fp64") if arch == 90 else ("bf16",)
        for dtype_name in dtypes + (("fp32",) if arch == 90 and (kind, k) == ("uniform", 8) else ()):
            for write_grad in (False, True):
                label = f"grebt_loss {kind} K={k} G={groups or 3} {dtype_name} {'grad' if write_grad else 'value'}"
                yield label, EVERY, _grebt_call(loss, kind, k, groups, DTYPES[dtype_name], write_grad)


def _grebt_call(loss, kind, k, groups, dtype, write_grad):
    def run():
        if kind == "uniform":
            rewards = torch.zeros(k * groups, dtype=dtype, requires_grad=write_grad)
            out = loss(rewards, k, max_group=k)
        else:
            sizes = [3, k, 7]
            cu = torch.tensor([0, 3, 3 + k, 10 + k], dtype=torch.int32)
            rewards = torch.zeros(sum(sizes), dtype=dtype, requires_grad=write_grad)
            out = loss(rewards, cu_groups=cu, max_group=k)
        if write_grad:
            out.backward()
    return run


def _score_mix_cases(arch):
    mix = dispatch.implementation("score_mix", "triton")
    paper = SIZES["paper-8b"]
    for name, batch, attn_dim, rm_dim in (("paper-8b", paper.batch, paper.attn_dim, paper.rm_dim),
                                          ("odd", 5, 37, 100)):
        for head_name, head_dtype, rte_dtype in (("fp32 head, bf16 rte", torch.float32, torch.bfloat16),
                                                 ("fp32", torch.float32, torch.float32),
                                                 ("fp64", torch.float64, torch.float64)):
            for bias in (True, False):
                for needs in ("all", "head", "rte"):
                    if arch == 80 and (name == "odd" or not bias):
                        continue
                    label = f"score_mix {name} {head_name} {'bias' if bias else 'no bias'} grads={needs}"
                    yield label, EVERY, _score_mix_call(mix, batch, attn_dim, rm_dim, head_dtype, rte_dtype,
                                                        bias, needs)


def _score_mix_call(mix, batch, attn_dim, rm_dim, head_dtype, rte_dtype, bias, needs):
    def run():
        head_grads = needs in ("all", "head")
        attended = torch.zeros(batch, attn_dim, dtype=head_dtype, requires_grad=head_grads)
        rte = torch.zeros(batch, rm_dim, dtype=rte_dtype, requires_grad=needs in ("all", "rte"))
        out_weight = torch.zeros(rm_dim, attn_dim, dtype=head_dtype, requires_grad=head_grads)
        score_weight = torch.zeros(1, rm_dim, dtype=head_dtype, requires_grad=head_grads)
        score_bias = torch.zeros(1, dtype=head_dtype, requires_grad=head_grads) if bias else None
        mix(attended, rte, out_weight, score_weight, score_bias, 0.7).sum().backward()
    return run


def cases(arch: int):
    """(label, EVERY or FIRST config the pruning keeps, run) of each case compiled for `arch`."""
    yield from _pool_cases(arch)
    yield from _grebt_cases(arch)
    yield from _score_mix_cases(arch)


def record(archs, pattern: str = "") -> list[Spec]:
    """Run every case (whose label matches `pattern`) once per target with launches recorded;
    the distinct specialisations."""
    for module in KERNEL_MODULES:
        _KERNELS.update(_kernels_of(module))
    patches = [(JITFunction, "_do_compile", _record), (Autotuner, "run", _launch_every_config),
               (splits, "multiprocessor_count", lambda device: MULTIPROCESSORS)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        for arch in archs:
            triton_driver.set_active(_PretendGPU(arch))
            for label, every_config, run in cases(arch):
                if re.search(pattern, label):
                    _CASE.update(label=label, every_config=every_config)
                    run()
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    return list(_RECORDED.values())


# --- compiling ---------------------------------------------------------------------------------

_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_spec(spec: Spec) -> dict:
    """Compile one specialisation; its registers, spills (bytes stored + loaded), shared memory
    and compile seconds, or the error."""
    started = time.perf_counter()
    source = ASTSource(_KERNELS[spec.kernel], spec.signature, spec.constexprs, spec.attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32),
                                      options=vars(spec.options))
    except Exception as exc:  # a compile error is the finding, reported with its message
        return {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    text = log.getvalue()
    usage, spill = _PTXAS_USAGE.findall(text), _PTXAS_SPILLS.findall(text)
    if not usage or not spill:
        return {"error": f"no ptxas report in Triton's output: {text[-500:]!r}"}
    return {"registers": int(usage[-1]), "stack": int(spill[-1][0]),
            "spills": int(spill[-1][1]) + int(spill[-1][2]),
            "shared": int(compiled.metadata.shared), "seconds": round(time.perf_counter() - started, 2)}


def _compile_index(index: int) -> dict:
    return compile_spec(_SPECS[index])


_SPECS: list[Spec] = []


def compile_all(specs: list[Spec], jobs: int) -> list[dict]:
    _SPECS[:] = specs
    if jobs <= 1:
        return [compile_spec(s) for s in specs]
    # fork: the workers inherit the recorded specialisations and the kernels
    import multiprocessing
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_index, range(len(specs)), chunksize=4))


# --- verdict -----------------------------------------------------------------------------------

def findings(specs: list[Spec], results: list[dict], archs, check_coverage=True) -> list[str]:
    """Everything that fails the check, one line each."""
    problems = []
    for spec, result in zip(specs, results):
        where = f"{spec.kernel} sm_{spec.arch} {spec.meta()} ({spec.cases[0]})"
        if "error" in result:
            problems.append(f"{where}: does not compile: {result['error']}")
            continue
        if result["shared"] > SHARED_LIMIT[spec.arch]:
            problems.append(f"{where}: {result['shared']} bytes of shared memory > {SHARED_LIMIT[spec.arch]}")
        if spec.arch == 90 and result["spills"] > SPILL_BOUNDS.get(spec.kernel, 0):
            problems.append(f"{where}: spills {result['spills']} bytes, above its bound of "
                            f"{SPILL_BOUNDS.get(spec.kernel, 0)} (SPILL_BOUNDS)")
    for kernel in sorted(set(SPILL_BOUNDS) - set(_KERNELS)):
        problems.append(f"{kernel}: has a SPILL_BOUNDS entry but is no kernel of r2m_kernels/triton")
    for arch in archs if check_coverage else ():
        launched = {s.kernel for s in specs if s.arch == arch}
        for kernel in sorted(set(_KERNELS) - launched):
            problems.append(f"{kernel}: no case launched it for sm_{arch}")
    return problems


def summary(specs: list[Spec], results: list[dict]) -> str:
    """Per kernel and target: specialisations, the range of registers, the spilling configs."""
    lines = []
    for kernel in sorted({s.kernel for s in specs}):
        for arch in sorted({s.arch for s in specs}, reverse=True):
            rows = [(s, r) for s, r in zip(specs, results) if s.kernel == kernel and s.arch == arch and "error" not in r]
            if not rows:
                continue
            regs = [r["registers"] for _, r in rows]
            spilling = [(s, r) for s, r in rows if r["spills"]]
            lines.append(f"{kernel} sm_{arch}: {len(rows)} specialisations, registers {min(regs)}-{max(regs)}, "
                         f"shared <= {max(r['shared'] for _, r in rows)} B, {len(spilling)} spill")
            for s, r in spilling:
                lines.append(f"    spills {r['spills']} B: {s.meta()} ({s.cases[0]})")
    return "\n".join(lines)


REFERENCE_CASES = ("attention_pool paper-8b bf16 mask", "attention_pool heads bf16 mask",
                   "grebt_loss uniform K=8 G=64 bf16", "score_mix paper-8b fp32 head, bf16 rte bias grads=all")


def markdown_table(specs: list[Spec], results: list[dict]) -> str:
    """Registers, spills and shared memory of every sm_90 specialisation of the reference cases."""
    lines = [f"Triton {triton.__version__}, sm_90:", "",
             "| kernel | case | config | registers | spill bytes | shared bytes |", "|---|---|---|---|---|---|"]
    rows = []
    for spec, result in zip(specs, results):
        case = next((c for c in spec.cases if c.startswith(REFERENCE_CASES)), None)
        if spec.arch == 90 and case and "error" not in result:
            config = ", ".join(f"{k}={v}" for k, v in spec.meta().items())
            rows.append(f"| `{spec.kernel}` | {case} | {config} | {result['registers']} | {result['spills']} | "
                        f"{result['shared']} |")
    return "\n".join(lines + sorted(rows)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability x10 to compile for (default: 90 and 80)")
    parser.add_argument("--report", help="write every specialisation and its ptxas numbers here (JSON)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--cases", default="", metavar="REGEX", help="only the cases whose label matches")
    parser.add_argument("--markdown", help="write the sm_90 table of the reference cases (paper-8b and heads "
                                           "bf16 with a mask, GREBT 64 x 8, score_mix at paper-8b) here")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    started = time.perf_counter()
    specs = record(archs, args.cases)
    recorded = time.perf_counter()
    results = compile_all(specs, args.jobs)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(specs)} specialisations "
          f"recorded in {recorded - started:.1f} s, compiled in {time.perf_counter() - recorded:.1f} s "
          f"for {', '.join(f'sm_{a}' for a in archs)}")
    print(summary(specs, results))
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "specialisations": [
                {"kernel": s.kernel, "arch": s.arch, "meta": s.meta(), "cases": s.cases, **r}
                for s, r in zip(specs, results)]}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(specs, results))
    problems = findings(specs, results, archs, check_coverage=not args.cases)
    for line in problems:
        print("FAIL", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
