"""Test setup. Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before any kernel module is imported, so it is set here, first."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.support import backends  # noqa: E402  (imports the kernels: after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # TRITON_INTERPRET is read when kernels are defined, so it cannot be on for some tests
        # and off for others: where CUDA is present the Triton kernels compile for the GPU and
        # the CPU-tensor tests of the interpreter cannot run.
        skip = pytest.mark.skip(reason="runs Triton on CPU tensors (interpreter only); the gpu tests cover it here")
        marker = "interpreter"
    else:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        marker = "gpu"
    for item in items:
        if marker in item.keywords and not (HAS_CUDA and "gpu" in item.keywords):
            item.add_marker(skip)
    # R2M_RUN_FIRST="tests/kernels/ tests/api/" (scripts/gpu_check.sh): those folders' tests
    # run first, in that order, so that a run cut short by its time limit has done them.
    first = os.environ.get("R2M_RUN_FIRST", "").split()
    if first:
        items.sort(key=lambda item: next((i for i, p in enumerate(first) if item.nodeid.startswith(p)), len(first)))


def pytest_collection_finish(session):
    """With R2M_COLLECTED_IDS set (by scripts/gpu_check.sh), the selected test ids go to that file,
    so that a run cut short by its time limit can say which tests it did not reach."""
    path = os.environ.get("R2M_COLLECTED_IDS")
    # One writer: xdist's first worker (or the only process); xdist's controller collects nothing.
    if path and session.items and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        with open(path, "w") as fh:
            fh.write("".join(f"{item.nodeid}\n" for item in session.items))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(params=backends.params(backends.ALL))
def backend(request, monkeypatch):
    """Each backend of the ops in turn, ready to run on tests.support.backends.DEVICE."""
    return backends.use(request.param, monkeypatch)


@pytest.fixture(params=backends.params(backends.COMPILED))
def compiled_backend(request, monkeypatch):
    """triton and cuda in turn (the backends with kernels and custom ops)."""
    return backends.use(request.param, monkeypatch)


@pytest.fixture
def cuda_contract(monkeypatch):
    """The cuda backend on CPU tensors through the launchers' contract model (any machine)."""
    return backends.install_cuda_contract(monkeypatch)
