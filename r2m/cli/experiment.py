"""`r2m experiment`: the command line of the paired experiment (r2m.experiment). Settings come
from TRL's parser, as in `r2m train`: the experiment's own section, R2MConfig and RLOOConfig, from
a YAML file and flags, flags last, under the preset's defaults."""

from __future__ import annotations

import sys

from ..experiment.run import run_experiment
from ..experiment.settings import PRESET_SETTINGS, PRESETS, ExperimentArguments, check
from .settings import UsageError, check_backend_runs, check_yaml, choice, make_parser, prescan, runs_on_cpu

HELP = ("A paired, multi-seed experiment: static RM vs R2M vs its ablations and the paper's Iterative "
        "RMHead baseline on TRL's RLOO, measured on held-out prompts (gold reward, frozen-RM reward, KL, "
        "length); a paired table, CSV, JSON, a plot and a Markdown summary. The default preset is the "
        "demo (SmolLM2-135M-Instruct, minutes on a CPU); --preset full is the README's experiment.")


def parse(argv: list[str]):
    """(ExperimentArguments, R2MConfig, RLOOConfig) from the preset, the YAML file and the flags."""
    from trl import RLOOConfig

    from ..config import R2MConfig

    from_yaml, picked = prescan(argv, ("preset", "device"), switches=("tiny",))
    preset = choice("preset", picked["preset"], PRESETS)
    on_cpu = runs_on_cpu(picked["device"])
    sections = (ExperimentArguments, R2MConfig, RLOOConfig)
    check_yaml(from_yaml, sections)
    defaults = dict(PRESET_SETTINGS[preset])
    if str(picked["tiny"]).lower() in ("true", "yes", "1"):
        defaults.update(rm_layers=0)  # the tiny model has 2 layers: the RM takes them all
    if on_cpu:
        defaults.update(use_cpu=True, bf16=False)  # TRL turns bf16 on by default, which needs a GPU
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
