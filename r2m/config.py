"""R2MConfig: the R2M section of a training run, beside TRL's own GRPOConfig or RLOOConfig.

Everything the RL engine owns (steps, batch sizes, sampling, the policy's optimizer, logging,
checkpoints) stays in TRL's config; this holds only what R2M adds: the mode (the method or one
of the paper's ablations) and the head. `TrlParser((..., R2MConfig, GRPOConfig))` reads both
from one YAML file and one set of flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .head import HEAD_BACKENDS

# The method and the paper's ablations (docs/design.md §1.4): the R2M reward with the head trained
# every step; the static RM; the head never trained; Gaussian noise instead of the policy's
# hidden states; Bradley-Terry only (GREBT alpha = 0); group reward entropy only (alpha = 1); the
# paper's Iterative RMHead baseline (its appendix G.5): no policy hidden states, the reward is the
# RM's own score head phi(rte), and GREBT on those rewards trains phi alone.
MODES = ("r2m", "static", "r2m-frozen", "noise", "bt-only", "gre-only", "iterative-head")

# The head's AdamW (default betas) takes a first step of head_learning_rate / (1 - 0.9), which
# torch converts to the head's float32: above this it raises there, before any finite check.
HEAD_LEARNING_RATE_MAX = 3.4028234663852886e38 * (1 - 0.9)


DEVICES = ("auto", "cpu", "cuda")  # what each command's --device takes


class UsageError(ValueError):
    """A bad setting (a flag, a YAML value, or a model they do not fit): each `r2m` command reports
    it as one line naming the setting, exit status 2."""


@dataclass
class R2MConfig:
    """What R2M adds to a TRL run. Validated on construction: a ValueError names the field.

    The head's settings belong to the R2MHead; this section only carries them to it, each by one
    route: attn_dim and num_heads are the shape of the head that `r2m train` and `r2m experiment`
    build; omega_floor and head_backend are set on the reward model's head once, by the trainer
    (`configure_head`), and read from the head after that.
    """

    _argument_group_name = "R2M"

    mode: str = field(default="r2m", metadata={
        "help": "reward: r2m (the head trained every step), static (the plain RM), r2m-frozen (head never "
                "trained), noise (Gaussian noise instead of the policy's hidden states), bt-only, gre-only, "
                "iterative-head (the paper's baseline: only the RM's score head trains, no hidden states)",
        "choices": list(MODES)})
    head_learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate of the R2M head (the paper: 1e-6 dialogue, 5e-7 TL;DR; a short run needs more)"})
    attn_dim: int = field(default=256, metadata={"help": "R2M attention width d"})
    num_heads: int = field(default=1, metadata={"help": "R2M attention heads"})
    omega_floor: float = field(default=0.6, metadata={"help": "floor of the time-step weight omega (the paper's Omega)"})
    grebt_alpha: float = field(default=0.3, metadata={"help": "GREBT mix alpha (bt-only forces 0, gre-only 1)"})
    head_backend: str = field(default="auto", metadata={
        "help": "R2MHead backend", "choices": list(HEAD_BACKENDS)})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first field out of range."""
        for name, choices in (("mode", MODES), ("head_backend", HEAD_BACKENDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        for name in ("attn_dim", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        for name, low, high in (("head_learning_rate", 0.0, math.inf), ("omega_floor", 0.0, 1.0),
                                ("grebt_alpha", 0.0, 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low <= value <= high):
                raise ValueError(f"{name} must be a finite number in [{low}, {high}]; got {value!r}")
        if not self.head_learning_rate > 0:
            raise ValueError(f"head_learning_rate must be > 0; got {self.head_learning_rate!r}")
        if self.head_learning_rate > HEAD_LEARNING_RATE_MAX:
            raise ValueError(f"head_learning_rate must be <= {HEAD_LEARNING_RATE_MAX:.4g}: the head's AdamW takes a "
                             f"first step of 10x the rate, which must be a float32 number (the head's weights); "
                             f"got {self.head_learning_rate!r}")
        if self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim ({self.attn_dim}) must be divisible by num_heads ({self.num_heads})")

    def configure_head(self, head) -> None:
        """Set this run's omega_floor and head_backend on `head` (an R2MHead)."""
        head.omega_floor = self.omega_floor
        head.backend = self.head_backend

    @property
    def alpha(self) -> float:
        """The GREBT mix the mode implies: bt-only is alpha = 0, gre-only alpha = 1."""
        return {"bt-only": 0.0, "gre-only": 1.0}.get(self.mode, self.grebt_alpha)

    @property
    def uses_head(self) -> bool:
        """False in static mode: the reward is the RM's own and the head is never run."""
        return self.mode != "static"

    @property
    def reads_hidden_states(self) -> bool:
        """Whether the reward reads the policy's hidden states (static and iterative-head do not)."""
        return self.mode not in ("static", "iterative-head")

    @property
    def trains_head(self) -> bool:
        return self.mode not in ("static", "r2m-frozen")
