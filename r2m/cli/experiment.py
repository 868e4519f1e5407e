"""`r2m experiment`: the command line of the paired experiment (r2m.experiment). Settings come
from TRL's parser, as in `r2m train`: the experiment's own section, R2MConfig and RLOOConfig, from
a YAML file and flags, flags last, under the preset's defaults."""

from __future__ import annotations

import sys

from ..experiment.run import run_experiment
from ..experiment.settings import PRESET_SETTINGS, PRESETS, ExperimentArguments, check
from .settings import (HELP_ALL, UsageError, check_backend_runs, check_yaml, choice, help_requested, make_parser,
                       prescan, runs_on_cpu, short_help)

HELP = ("A paired, multi-seed experiment: static RM vs R2M vs its ablations and the paper's Iterative "
        "RMHead baseline on TRL's RLOO, measured on held-out prompts (gold reward, frozen-RM reward, KL, "
        "length); a paired table, CSV, JSON, a plot and a Markdown summary. The default preset is the "
        "demo (SmolLM2-135M-Instruct, minutes on a CPU); --preset full is the README's experiment.")


# The TRL settings the short help lists (a test checks each is a field of RLOOConfig)
TRL_OPTIONS = {
    "output_dir": "the experiment's folder: each run's log, the table, CSV, JSON, plot and summary",
    "max_steps": "optimizer steps per run, also omega's schedule length",
    "learning_rate": "the policy's learning rate (the head's: --head_learning_rate)",
    "per_device_train_batch_size": "completions per optimizer step",
    "num_generations": "completions per prompt: the group R2M compares",
    "max_completion_length": "the longest completion, in tokens",
    "temperature": "the sampling temperature",
    "num_iterations": "optimizer steps over each generation batch (2: the head update reads the updated policy)",
    "beta": "the KL coefficient against the reference policy (the held-out KL is measured either way)",
}


def parse(argv: list[str]):
    """(ExperimentArguments, R2MConfig, RLOOConfig) from the preset, the YAML file and the flags."""
    from ..config import R2MConfig

    from_yaml, picked = prescan(argv, ("preset", "device"), switches=("tiny",))
    preset = choice("preset", picked["preset"], PRESETS)
    defaults = dict(PRESET_SETTINGS[preset])
    if str(picked["tiny"]).lower() in ("true", "yes", "1"):
        defaults.update(rm_layers=0)  # the tiny model has 2 layers: the RM takes them all
    if help_requested(argv) == "short":
        print(short_help("r2m experiment", HELP, (ExperimentArguments, R2MConfig), defaults, TRL_OPTIONS))
        sys.exit(0)
    from trl import RLOOConfig

    on_cpu = runs_on_cpu(picked["device"])
    sections = (ExperimentArguments, R2MConfig, RLOOConfig)
    check_yaml(from_yaml, sections)
    if on_cpu:
        defaults.update(use_cpu=True, bf16=False)  # TRL turns bf16 on by default, which needs a GPU
    argv = ["--help" if arg == HELP_ALL else arg for arg in argv]  # TrlParser's help is every option
    parser = make_parser(sections, defaults, prog="r2m experiment", description=HELP)
    experiment, r2m_config, args = parser.parse_args_and_config(argv)
    check(experiment, args)
    check_backend_runs(r2m_config, on_cpu)
    return experiment, r2m_config, args


def main(argv: list[str]) -> int:
    try:
        experiment, r2m_config, args = parse(argv)
        run_experiment(experiment, r2m_config, args, argv=argv)
        return 0
    except UsageError as e:
        print(f"r2m experiment: error: {e}", file=sys.stderr)
        return 2
