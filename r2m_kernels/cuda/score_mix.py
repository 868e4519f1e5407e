"""The `cuda` backend of score_mix: no kernel of its own. It is a few small matmuls, so the
backend runs the torch implementation (on the GPU that is cuBLAS)."""

from .. import dispatch
from ..reference import score_mix_torch
from .extension import why_not_device

dispatch.register("score_mix", "cuda", score_mix_torch, why_not_device)
