"""R2MConfig: every setting of an R2M training run, one dataclass. A YAML file and CLI flags map
onto it field by field (flag --field-name, YAML key field_name); flags override the file,
the file overrides the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field, fields

from .head import HEAD_BACKENDS

MODES = ("r2m", "static", "r2m-frozen", "noise", "bt-only", "gre-only")
ADVANTAGES = ("rloo", "grpo")
# No fp16: it needs loss scaling (a GradScaler) to keep small gradients from underflowing, which
# the trainer does not do; bf16 has fp32's exponent range and needs none.
AMP_DTYPES = ("none", "bf16")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class R2MConfig:
    """Settings of one run. Step counts are RL steps (one batch of n prompts x K samples)."""

    mode: str = field(default="r2m", metadata={"help": "reward: r2m (trained head), static (plain RM), "
                                                       "r2m-frozen (head never trained), noise (hidden "
                                                       "states replaced by Gaussian noise), bt-only, gre-only"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, noise and prompt order"})
    steps: int = field(default=20, metadata={"help": "total RL steps T (also the omega schedule's T)"})
    prompts_per_step: int = field(default=8, metadata={"help": "n prompts per step"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K samples per prompt (the group)"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also used in the log-probs)"})
    system_prompt: typing.Optional[str] = field(default=None, metadata={"help": "system message for the policy's chat template"})
    advantage: str = field(default="rloo", metadata={"help": "rloo or grpo"})
    policy_lr: float = field(default=1e-5, metadata={"help": "policy learning rate (AdamW)"})
    policy_epochs: int = field(default=1, metadata={"help": "policy optimisation epochs per batch"})
    clip_eps: float = field(default=0.2, metadata={"help": "importance-ratio clip range"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty to the reference policy"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "policy gradient clipping (0 = off)"})
    train_last_layers: typing.Optional[int] = field(default=None, metadata={"help": "train only the policy's last N decoder layers (default: all)"})
    micro_batch_size: typing.Optional[int] = field(default=None, metadata={"help": "sequences per policy forward (default: the whole batch)"})
    head_lr: float = field(default=1e-4, metadata={"help": "R2M head learning rate (AdamW)"})
    attn_dim: int = field(default=256, metadata={"help": "R2M attention width d"})
    num_heads: int = field(default=1, metadata={"help": "R2M attention heads"})
    omega_floor: float = field(default=0.6, metadata={"help": "omega's floor (Omega)"})
    alpha: float = field(default=0.3, metadata={"help": "GREBT mix (bt-only forces 0, gre-only 1)"})
    head_backend: str = field(default="auto", metadata={"help": "R2MHead backend: " + ", ".join(HEAD_BACKENDS)})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    amp: str = field(default="none", metadata={"help": "autocast dtype for the policy and RM forwards: none or "
                                                      "bf16 (no fp16: it would need loss scaling)"})
    output_dir: str = field(default="runs/r2m", metadata={"help": "metrics.jsonl and checkpoint/ go here"})
    checkpoint: bool = field(default=True, metadata={"help": "write checkpoint/ at the end (and every save_every steps)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first field out of range."""
        if self.amp == "fp16":
            raise ValueError("amp='fp16' is not supported: fp16 training needs loss scaling (a GradScaler) "
                             "to keep gradients from underflowing, which this trainer does not do; use amp='bf16'")
        for name, choices in (("mode", MODES), ("advantage", ADVANTAGES), ("amp", AMP_DTYPES),
                              ("head_backend", HEAD_BACKENDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "policy_epochs",
                     "attn_dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_last_layers", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {getattr(self, name)}")
        for name in ("temperature", "clip_eps", "policy_lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "max_grad_norm", "save_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("alpha", "omega_floor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim ({self.attn_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 with advantage='rloo' (the leave-one-out baseline)")

    @property
    def grebt_alpha(self) -> float:
        """The GREBT mix the mode implies: bt-only is alpha = 0, gre-only alpha = 1."""
        return {"bt-only": 0.0, "gre-only": 1.0}.get(self.mode, self.alpha)

    @property
    def trains_head(self) -> bool:
        return self.mode not in ("static", "r2m-frozen")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "R2MConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def check_keys(cls, values: dict) -> dict:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown R2MConfig keys: {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "R2MConfig":
        return cls(**cls.check_keys(values))

    @classmethod
    def read_yaml(cls, path) -> dict:
        """The mapping in a YAML file, its keys checked against the fields."""
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of R2MConfig keys, got {type(values).__name__}")
        return cls.check_keys(values)

    @classmethod
    def from_yaml(cls, path, base: "R2MConfig | None" = None) -> "R2MConfig":
        """`base` (defaults when None) with the file's values replaced."""
        return dataclasses.replace(base if base is not None else cls(), **cls.read_yaml(path))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field. Defaults are SUPPRESSed so that only the flags given override."""
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group("R2MConfig (each flag overrides the YAML file and the defaults)")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(hints[f.name])
            help_text = f"{f.metadata.get('help', '')} [default: {f.default}]"
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                choices = {"mode": MODES, "advantage": ADVANTAGES, "amp": AMP_DTYPES,
                           "head_backend": HEAD_BACKENDS}.get(f.name)
                group.add_argument(flag, dest=f.name, type=kind, choices=choices,
                                   default=argparse.SUPPRESS, help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: "R2MConfig | None" = None) -> "R2MConfig":
        """`base` (defaults when None) with the fields present in `args` replaced."""
        base = base if base is not None else cls()
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return dataclasses.replace(base, **given)

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _base_type(hint):
    """int for Optional[int], and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
