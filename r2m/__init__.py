"""r2m: Real-Time Aligned Reward Models (R2M) for RLHF.

The model and training layer: R2MHead, the GREBT loss, the omega schedule. The kernels it
runs on live in r2m_kernels.
"""

from r2m_kernels import __version__

from .head import R2MHead
from .loss import GREBTLoss
from .schedule import omega

__all__ = ["R2MHead", "GREBTLoss", "omega", "__version__"]
