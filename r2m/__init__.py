"""r2m: Real-Time Aligned Reward Models (R2M) for RLHF.

The model and training layer: R2MHead, the GREBT loss, the omega schedule, the reward-model
wrapper and the R2M section of a training run. Training runs on TRL: r2m.integrations.trl.
The kernels it runs on live in r2m_kernels.
"""

from r2m_kernels import __version__

from .head import R2MHead
from .loss import GREBTLoss
from .schedule import omega

__all__ = ["R2MHead", "GREBTLoss", "omega", "R2MConfig", "R2MRewardModel", "__version__"]

_LAZY = {"R2MConfig": ".config", "R2MRewardModel": ".reward_model"}


def __getattr__(name):
    """R2MConfig and R2MRewardModel import on first use: `import r2m` alone should not pay for
    what they pull in."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
