"""The settings of `r2m experiment`: its own section (ExperimentArguments, read by TRL's parser
beside R2MConfig and RLOOConfig), the presets, and the checks of what the paired design can run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import DEVICES, MODES, UsageError

PRESETS = ("demo", "full")
DEFAULT_ARMS = "static,r2m,r2m-frozen,iterative-head"

# CPU-sized settings (docs/design.md §1.1 lists the paper's). Kept by the paper: Omega 0.6,
# alpha 0.3 (R2MConfig's defaults), two policy epochs per batch (num_iterations=2, so the head
# update sees the refreshed policy's hidden states), RLOO, temperature 0.7. Ours: the head
# learning rate (the paper's 1e-6 would not move the head in a few dozen steps), d, the batch,
# the steps, the learning rate, 16 new tokens (the questions have one-word answers; SmolLM2 starts
# with a sentence, which 16 tokens leave room to end), the policy's last 4 layers
# trained, the RM's backbone the policy's first 12 layers, beta = 0 with the KL measured on the
# held-out set instead (it saves a reference forward per batch).
COMMON = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=16, temperature=0.7,
              learning_rate=1e-4, lr_scheduler_type="constant", beta=0.0, num_iterations=2,
              gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=1,
              head_learning_rate=3e-3, attn_dim=64, eval_samples=2)
PRESET_SETTINGS = {
    # 8 steps: 4 head updates, enough for the head's attention to move (2 barely showed it)
    "demo": dict(COMMON, max_steps=8, output_dir="runs/experiment", seeds="0,1", eval_every=4,
                 arms="static,r2m,iterative-head", rm_fit_prompts=16, eval_prompts=8),
    "full": dict(COMMON, max_steps=24, output_dir="runs/experiment-full", seeds="0,1,2,3,4", eval_every=6,
                 arms=DEFAULT_ARMS, rm_fit_prompts=32, eval_prompts=0),
}


@dataclass
class ExperimentArguments:
    """What `r2m experiment` needs beside TRL's RLOOConfig and the R2M section."""

    _argument_group_name = "r2m experiment"

    preset: str = field(default="demo", metadata={
        "help": "demo (a few minutes on a CPU) or full (the README's experiment)", "choices": list(PRESETS)})
    arms: str = field(default=DEFAULT_ARMS, metadata={
        "help": "comma-separated modes to compare with static (run too unless --with_static false): r2m, "
                "r2m-frozen, iterative-head, noise, bt-only, gre-only"})
    with_static: bool = field(default=True, metadata={
        "help": "run the static arm, which every paired difference needs; false runs only --arms (a pilot "
                "that reads the training batches' diagnostics needs no static arm)"})
    arm_head_learning_rates: str = field(default="", metadata={
        "help": "comma-separated ARM=RATE pairs: those arms' head learning rate instead of head_learning_rate "
                "(e.g. iterative-head=1e-2, the baseline tuned on its own)"})
    seeds: str = field(default="0,1", metadata={"help": "comma-separated seeds; each seed pairs all arms"})
    eval_every: int = field(default=4, metadata={
        "help": "evaluate on the held-out prompts every N optimizer steps (and at step 0 and the last); "
                "a multiple of the optimizer steps per generation batch (num_iterations × steps_per_generation)"})
    eval_samples: int = field(default=2, metadata={"help": "completions per held-out prompt"})
    eval_prompts: int = field(default=0, metadata={
        "help": "how many of the held-out prompts to evaluate on, the first N (0: all of them)"})
    eval_seed: int = field(default=1234, metadata={"help": "the held-out sampling seed (every evaluation, every arm)"})
    train_last_layers: int = field(default=4, metadata={
        "help": "train only the policy's last N decoder layers (0: all of them)"})
    rm_layers: int = field(default=12, metadata={
        "help": "the reward model's frozen backbone: the policy model's first N layers (0: all)"})
    rm_fit_prompts: int = field(default=32, metadata={
        "help": "training prompts whose initial samples (num_generations each) fit the reward model"})
    brevity_bias: float = field(default=1.0, metadata={
        "help": "the RM labeller's bias toward short answers (tasks.biased_preference)"})
    label_noise: float = field(default=0.3, metadata={"help": "the RM labeller's noise SD"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": list(DEVICES)})
    tiny: bool = field(default=False, metadata={
        "help": "a tiny random-weight model instead of SmolLM2 (a smoke run in seconds)"})
    model_cache: str = field(default="runs/models", metadata={
        "help": "where the de-quantized policy folder is written once and reused"})

    def arm_list(self) -> list[str]:
        arms = [a.strip() for a in self.arms.split(",") if a.strip()]
        for arm in arms:
            if arm not in MODES:
                raise UsageError(f"arms: {arm!r} is not one of {', '.join(MODES)}")
        if len(set(arms)) != len(arms):
            raise UsageError(f"arms: {self.arms!r} names an arm twice")
        if not arms and not self.with_static:
            raise UsageError("arms: none given, and --with_static false leaves nothing to run")
        static = ["static"] if self.with_static or "static" in arms else []
        return static + [a for a in arms if a != "static"]

    def arm_head_learning_rate_map(self) -> dict[str, float]:
        """{arm: head learning rate} from arm_head_learning_rates; UsageError naming a bad pair."""
        rates = {}
        for pair in (p.strip() for p in self.arm_head_learning_rates.split(",") if p.strip()):
            arm, _, rate = (x.strip() for x in pair.partition("="))
            if arm not in MODES or arm == "static":
                raise UsageError(f"arm_head_learning_rates: {arm!r} is not an arm with a head "
                                 f"({', '.join(m for m in MODES if m != 'static')})")
            try:
                value = float(rate)
            except ValueError:
                raise UsageError(f"arm_head_learning_rates: {pair!r} is not ARM=RATE") from None
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"arm_head_learning_rates: {arm}'s rate {rate} must be a finite number > 0")
            if arm in rates:
                raise UsageError(f"arm_head_learning_rates: {arm!r} is named twice")
            rates[arm] = value
        return rates

    def head_learning_rate_of(self, arm: str, default: float) -> float:
        return self.arm_head_learning_rate_map().get(arm, default)

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"seeds: {self.seeds!r} is not a comma-separated list of integers") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UsageError(f"seeds: {self.seeds!r} must name at least one seed, each once")
        return seeds


def check(experiment: ExperimentArguments, args) -> None:
    """UsageError for settings the paired design cannot run with."""
    arms = experiment.arm_list()
    experiment.seed_list()
    for arm in experiment.arm_head_learning_rate_map():
        if arm not in arms:
            raise UsageError(f"arm_head_learning_rates: {arm!r} is not among the arms run ({', '.join(arms)})")
    cycle = args.num_iterations * (args.steps_per_generation or 1)
    for name in ("eval_every", "eval_samples", "rm_fit_prompts"):
        if getattr(experiment, name) < 1:
            raise UsageError(f"{name} must be >= 1; got {getattr(experiment, name)}")
    if experiment.eval_every % cycle:
        raise UsageError(f"eval_every ({experiment.eval_every}) must be a multiple of the optimizer steps per "
                         f"generation batch ({cycle}), so that an evaluation falls between batches")
    if args.max_steps < 1:
        raise UsageError(f"max_steps must be >= 1 (the schedule length T); got {args.max_steps}")
    if args.gradient_accumulation_steps != 1:
        raise UsageError("gradient_accumulation_steps must be 1 in the experiment (one batch, one step)")
    for name in ("train_last_layers", "rm_layers", "eval_prompts"):
        if getattr(experiment, name) < 0:
            raise UsageError(f"{name} must be >= 0; got {getattr(experiment, name)}")
