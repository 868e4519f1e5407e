"""r2m_kernels: the low-level ops of R2M (attention pooling, GREBT loss, score mix) and their backends.

Knows nothing of transformers; `r2m` builds the model and training layer on top of it.
"""

from . import dispatch, reference
from .dispatch import BACKENDS, BackendUnavailableError, available_backends, why_unavailable
from .interface import attention_pool, grebt_loss, score_mix
from .precision import accumulation_dtype
from .reference import padded_sequences
from .validation import finite_checks

__version__ = "0.1.0"
__all__ = ["attention_pool", "grebt_loss", "score_mix", "available_backends", "why_unavailable", "finite_checks",
           "BackendUnavailableError", "BACKENDS", "padded_sequences", "accumulation_dtype",
           "__version__"]


def _runs_anywhere(device):
    return None


dispatch.register("attention_pool", "torch", reference.attention_pool_torch, _runs_anywhere)
dispatch.register("grebt_loss", "torch", reference.grebt_loss_torch, _runs_anywhere)
dispatch.register("score_mix", "torch", reference.score_mix_torch, _runs_anywhere)

try:
    from . import triton as _triton_backend
except ImportError as exc:  # no triton on this platform: the torch backend still works
    dispatch.mark_unavailable("triton", f"triton is not importable ({exc})")

from . import cuda as _cuda_backend  # noqa: E402,F401  (registers; the extension loads on first use)
