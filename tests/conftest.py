"""Test setup. Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before any kernel module is imported, so it is set here, first."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed, whatever ran before it."""
    torch.manual_seed(0)
