"""The `r2m bench` ops under pytest-benchmark: `pytest benchmarks --benchmark-only`.

Same cases as `r2m bench` (r2m/bench/cases.py): docs/design.md §6 sizes in bf16 when CUDA is present,
the tiny-cpu size in fp32 on the CPU. Each test times one (op, size, backend) phase:
`forward` alone or `step` (forward+backward, plus AdamW for update and rm-update). The
`r2m bench` command adds what pytest-benchmark does not: do_bench's L2 flushing, peak memory,
the bandwidth floor, speedups, plots.
"""

import gc

import pytest
import torch

from r2m.bench.cases import BUILDERS, OPS, backends_for
from r2m.bench.rm_update import fitting_rm_full_case
from r2m.bench.sizes import CPU_DEFAULT, GPU_DEFAULT, SIZES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZE_NAMES = GPU_DEFAULT if DEVICE.type == "cuda" else CPU_DEFAULT


def _cases(op, phases):
    names, _ = backends_for(OPS[op], DEVICE)
    return [pytest.param(op, size, backend, phase, id=f"{op}-{size}-{backend}-{phase}")
            for size in SIZE_NAMES for backend in names for phase in phases]


def _timed(fn, leaves=()):
    """fn with the gradients cleared first and the GPU synchronised after."""
    def call():
        for leaf in leaves:
            leaf.grad = None
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
    return call


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("op,size,backend,phase", _cases("pool", ("forward", "step"))
                         + _cases("head", ("forward", "step")) + _cases("grebt", ("forward", "step"))
                         + _cases("update", ("step",)))
def test_op(benchmark, op, size, backend, phase):
    case = BUILDERS[op](SIZES[size], backend, DTYPE, DEVICE)
    benchmark.extra_info.update(op=op, size=size, backend=backend, phase=phase, note=case.note)
    benchmark(_timed(case.forward if phase == "forward" else case.step, case.leaves))


# The full reward-model update takes seconds per step on the GPU: a few rounds, not calibration.
@pytest.mark.parametrize("op,size,backend,phase", _cases("rm-update", ("step",)))
def test_rm_update(benchmark, op, size, backend, phase):
    if backend == "rm-full":
        case = fitting_rm_full_case(SIZES[size], "auto", DTYPE, DEVICE)
    else:
        case = BUILDERS["update"](SIZES[size], backend.removeprefix("r2m-"), DTYPE, DEVICE)
    benchmark.extra_info.update(op=op, size=size, backend=backend, phase=phase, note=case.note)
    benchmark.pedantic(_timed(case.step, case.leaves), rounds=3, warmup_rounds=1)
