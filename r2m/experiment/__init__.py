"""`r2m experiment`: the paired, multi-seed experiment (static RM against R2M, its ablations and the
paper's Iterative RMHead baseline, on TRL's RLOO, measured on a fixed held-out set) and the demo it
runs by default.

    settings.py    its own settings section, the presets and their checks
    run.py         the set-up every arm shares, one arm, every arm of every seed
    evaluation.py  the held-out evaluation (a TrainerCallback)
    report.py      the paired table, CSV, JSON, plot and Markdown summary
    stats.py       the paired statistics (t intervals, area under the curve)
    tasks.py       the prompt set, the gold judge and the biased labeller
    models.py      the SmolLM2 policy, the reward model's backbone and its fit
    tiny.py        a tiny random-weight Llama and tokenizer (smoke runs and tests)

The command line is r2m.cli.experiment.
"""
