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

# What the head's attention reads (docs/design.md §1.2): the whole prompt + completion, as the
# paper's section 4.1 has it, or the completion only (ours, a deviation: at a large head learning rate
# the head learns to attend to prompt tokens every completion of a group shares, and then cannot
# tell the completions apart).
HEAD_ATTENDS = ("sequence", "completion")

# The head's AdamW (default betas) takes a first step of head_learning_rate / (1 - 0.9), which
# torch converts to the head's float32: above this it raises there, before any finite check.
HEAD_LEARNING_RATE_MAX = 3.4028234663852886e38 * (1 - 0.9)


DEVICES = ("auto", "cpu", "cuda")  # what each command's --device takes

# The fields that decide the reward model's head, each with the R2MHead attribute it sets:
# R2MRewardModel builds its head from them and saves them with it, and a trainer refuses a
# reward model whose head disagrees with its r2m_config on any of them.
HEAD_FIELDS = {"attn_dim": "attn_dim", "num_heads": "num_heads", "omega_floor": "omega_floor",
               "head_backend": "backend"}


class UsageError(ValueError):
    """A bad setting (a flag, a YAML value, or a model they do not fit): each `r2m` command reports
    it as one line naming the setting, exit status 2."""


def message_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty: what
    a one-line UsageError quotes of a library's exception."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass
class R2MConfig:
    """What R2M adds to a TRL run. Validated on construction: a ValueError names the field.

    It is the one place that decides the head (HEAD_FIELDS): `R2MRewardModel(..., config=)` and
    `R2MRewardModel.from_sequence_classifier(..., config=)` build the head from it, and a trainer
    given a reward model whose head disagrees with its r2m_config refuses it (`check_head`).
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
    head_attends: str = field(default="sequence", metadata={
        "help": "what the head's attention reads: sequence (prompt + completion, the paper's section 4.1) or "
                "completion (the completion's positions only; a deviation from the paper)",
        "choices": list(HEAD_ATTENDS)})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first field out of range."""
        for name, choices in (("mode", MODES), ("head_backend", HEAD_BACKENDS), ("head_attends", HEAD_ATTENDS)):
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

    def head_kwargs(self) -> dict:
        """R2MHead's keyword arguments for the head this config describes."""
        return {attribute: getattr(self, name) for name, attribute in HEAD_FIELDS.items()}

    def check_head(self, head) -> None:
        """ValueError naming the first head setting on which `head` (an R2MHead) disagrees."""
        for name, attribute in HEAD_FIELDS.items():
            if getattr(head, attribute) != getattr(self, name):
                raise ValueError(f"reward_model's head has {name}={getattr(head, attribute)!r} but r2m_config has "
                                 f"{name}={getattr(self, name)!r}: build the reward model from the run's R2MConfig "
                                 "(R2MRewardModel.from_sequence_classifier(..., config=r2m_config))")

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
