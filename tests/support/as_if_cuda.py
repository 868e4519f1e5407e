"""A pytest plugin for the GPU check's dry run (`-p tests.support.as_if_cuda`): torch reports one
CUDA device, so that a CPU machine collects the tests a GPU machine would run (their parameters
depend on which backends can run). For collecting only: nothing can run on the pretended device."""

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
