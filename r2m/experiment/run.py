"""The paired experiment's run: does R2M curb over-optimisation here? A paired, multi-seed
experiment on TRL's RLOO (R2MRLOOTrainer), with the paper's baselines, measured on a fixed
held-out set. Its command line is r2m.cli.experiment, its settings r2m.experiment.settings.

Every arm (a mode of R2MConfig: static, r2m, r2m-frozen, iterative-head, ...) of a seed starts
from the same policy, the same reward model and the same head initialisation, and trains on the
same prompts in the same order with the same sampling seed; the evaluation draws its own random
numbers apart (r2m.experiment.evaluation). The presets: `demo` (the default, what scripts/demo.sh
runs: minutes on a 2-core CPU) and `full` (the README's measured answer). Outputs: OUTPUT_DIR/report.{json,csv,md,png}, one folder per
seed and arm with its TRL log history and held-out rows, and the fitted reward model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import shlex
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..config import UsageError
from .settings import ExperimentArguments
from .tasks import GOLD_MAX  # tiny_judge's maximum too

# set-up ------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every arm of every seed shares: the policy's folder, the tokenizer, the RM's frozen
    backbone and fitted score head, the frozen reference policy (for the held-out KL), the
    training and held-out prompts, the judge, and the RTE cache (the RM is frozen, so an RTE
    computed in one arm is valid in every other)."""
    folder: Path
    tokenizer: object
    backbone: object
    score: object
    reference: object
    train_prompts: list
    eval_prompts: list
    judge: object
    rm_fit: dict
    rte_cache: OrderedDict
    initial_eval: dict | None = None  # the step-0 held-out row, the same for every arm and seed


def _tasks(tiny: bool):
    """(training prompts, held-out prompts, judge in TRL's form, gold(prompt, text))."""
    from . import models, tasks

    if tiny:
        from .tiny import TINY_PROMPTS, tiny_judge, tiny_judge_func

        def gold(prompt, text):
            return tiny_judge(models.question_of(prompt), text)

        held_out = TINY_PROMPTS[::4]
        train = [p for p in TINY_PROMPTS if p not in held_out]
        return ([models.conversation(q, system=False) for q in train],
                [models.conversation(q, system=False) for q in held_out], tiny_judge_func, gold)

    def gold(prompt, text):
        return tasks.gold_reward(models.question_of(prompt), text)

    return ([models.conversation(q) for q in tasks.TRAIN_PROMPTS], [models.conversation(q) for q in tasks.EVAL_PROMPTS],
            tasks.gold_reward_func, gold)


def rm_settings(experiment: ExperimentArguments, args) -> dict:
    """Everything the fitted reward model depends on (its cache key)."""
    train_prompts = _tasks(experiment.tiny)[0][:experiment.rm_fit_prompts]
    return dict(prompts=hashlib.sha1(json.dumps(train_prompts).encode()).hexdigest()[:12], tiny=experiment.tiny, rm_layers=experiment.rm_layers, rm_fit_prompts=experiment.rm_fit_prompts,
                brevity_bias=experiment.brevity_bias, label_noise=experiment.label_noise,
                k=args.num_generations, max_new_tokens=args.max_completion_length, temperature=args.temperature)


def build_setup(experiment: ExperimentArguments, args, out: Path, log) -> Setup:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from . import models

    started = time.perf_counter()
    folder = models.policy_folder(Path(experiment.model_cache), experiment.tiny)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = models.reward_backbone(folder, experiment.rm_layers or None)
    reference = models.load_policy(folder, None).eval().requires_grad_(False)
    train_prompts, eval_prompts, judge, gold = _tasks(experiment.tiny)
    eval_prompts = eval_prompts[:experiment.eval_prompts or None]
    log(f"models loaded in {time.perf_counter() - started:.0f} s")

    settings = rm_settings(experiment, args)
    head_file, stats_file = out / "reward_model.safetensors", out / "reward_model.json"
    dim = backbone.config.hidden_size
    score = torch.nn.Linear(dim, 1)
    if head_file.exists() and stats_file.exists() and json.loads(stats_file.read_text())["settings"] == settings:
        score.load_state_dict(load_file(head_file))
        fit = json.loads(stats_file.read_text())
        log("reward model: reusing the fit in " + str(head_file))
    else:
        t0 = time.perf_counter()
        fitted, stats = models.fit_reward_model(
            reference, tokenizer, backbone, train_prompts[:experiment.rm_fit_prompts], gold, k=args.num_generations,
            batch_prompts=args.per_device_train_batch_size // args.num_generations,
            max_new_tokens=args.max_completion_length, temperature=args.temperature,
            brevity_bias=experiment.brevity_bias, max_words=args.max_completion_length,
            label_noise=experiment.label_noise, l2=1e-3, steps=300, seed=0)
        score.load_state_dict(fitted.state_dict())
        fit = {"settings": settings, "stats": stats, "seconds": time.perf_counter() - t0}
        save_file({k: v.contiguous() for k, v in score.state_dict().items()}, head_file)
        stats_file.write_text(json.dumps(fit, indent=1))
        log(f"reward model fitted in {fit['seconds']:.0f} s on {stats['samples']} initial samples: agrees with its "
            f"labels on {stats['agree_labels']:.0%}, with gold on {stats['agree_gold']:.0%}, with length on "
            f"{stats['agree_length']:.0%} of within-group pairs")
    return Setup(folder, tokenizer, backbone, score, reference, train_prompts, eval_prompts, judge, fit, OrderedDict())


# one arm -----------------------------------------------------------------------------------------

class RecordingJudge:
    """The judge, recording the questions of every call (one call per generation batch): the
    record shows that paired arms trained on the same prompts in the same order."""

    def __init__(self, judge):
        self.judge, self.calls = judge, []

    def __call__(self, prompts, completions, **kwargs):
        from .models import question_of

        self.calls.append([question_of(p) for p in prompts])
        return self.judge(prompts=prompts, completions=completions, **kwargs)


def run_arm(setup: Setup, experiment: ExperimentArguments, r2m_config, args, seed: int, arm: str, out: Path,
            progress=None) -> dict:
    """Train one arm of one seed (its head learning rate: the arm's own when
    --arm_head_learning_rates names it); returns its record (TRL's per-step log, the held-out
    rows, the prompts it trained on, its head settings, its wall time)."""
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from .models import load_policy
    from .evaluation import HeldOutEvaluation
    from ..integrations.trl import R2MRLOOTrainer
    from ..reward_model import R2MRewardModel

    run_args = copy.deepcopy(args)
    run_args.output_dir, run_args.seed = str(out), seed
    run_r2m = dataclasses.replace(r2m_config, mode=arm, head_learning_rate=experiment.head_learning_rate_of(
        arm, r2m_config.head_learning_rate))
    set_seed(seed)  # the head's initialisation, like everything after it, follows the seed
    policy_dim = setup.reference.config.hidden_size
    rm = R2MRewardModel(setup.backbone, copy.deepcopy(setup.score), policy_dim, config=run_r2m)
    rm.share_cache(setup.rte_cache)
    policy = load_policy(setup.folder, experiment.train_last_layers or None)
    judge = RecordingJudge(setup.judge)
    trainer = R2MRLOOTrainer(policy, rm, args=run_args, r2m_config=run_r2m, processing_class=setup.tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": setup.train_prompts}), judge=judge)
    trainer.remove_callback(ProgressCallback)  # TRL's bar prints every step's metrics dict; ours is one line
    evaluation = HeldOutEvaluation(trainer, setup.eval_prompts, setup.reference, every=experiment.eval_every,
                                   samples=experiment.eval_samples, seed=experiment.eval_seed,
                                   judge=setup.judge, initial=setup.initial_eval)
    trainer.add_callback(evaluation)
    if progress is not None:
        trainer.add_callback(progress)
    started = time.perf_counter()
    trainer.train()
    setup.initial_eval = evaluation.rows[0]
    return {"seed": seed, "arm": arm, "head_learning_rate": run_r2m.head_learning_rate,
            "head_attends": run_r2m.head_attends, "seconds": time.perf_counter() - started,
            "train": [row for row in trainer.state.log_history if "step_time" in row or "reward" in row],
            "eval": evaluation.rows, "prompts": judge.calls}


def _progress_callback(total: int):
    """One tqdm bar over every optimizer step of every run, naming the run."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    class Progress(TrainerCallback):
        name = ""

        def on_step_end(self, args, state, control, **kwargs):
            bar.set_description(self.name)
            bar.update(1)

    return bar, Progress()


# the whole experiment --------------------------------------------------------------------------

def digest_settings(experiment, r2m_config, args) -> dict:
    """Every setting a run's numbers depend on: the experiment's (but which arms and seeds run,
    and the preset, which only supplies defaults), the R2M section's (the head learning rate and
    what the head attends to included; the mode is the arm) with each arm's own head learning
    rate, and TRL's that shape training."""
    keep = {k: v for k, v in dataclasses.asdict(experiment).items()
            if k not in ("arms", "seeds", "preset", "with_static", "arm_head_learning_rates")}
    keep["arm_head_learning_rates"] = experiment.arm_head_learning_rate_map()
    trl_keys = ("max_steps", "per_device_train_batch_size", "num_generations", "max_completion_length",
                "temperature", "top_k", "top_p", "learning_rate", "lr_scheduler_type", "beta", "num_iterations",
                "steps_per_generation", "loss_type", "epsilon", "epsilon_high", "normalize_advantages")
    keep.update({k: getattr(args, k, None) for k in trl_keys})
    keep.update({k: v for k, v in dataclasses.asdict(r2m_config).items() if k != "mode"})
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def settings_digest(settings: dict) -> str:
    """A hash of digest_settings: a record on disk is reused only when it matches."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def check_output_folder(out: Path, settings: dict) -> None:
    """UsageError when `out` holds a finished run (seedN/ARM/record.json) made with other
    settings: continuing there would mix two experiments in one report (or rerun over them).
    Runs made with these settings are reused, so an interrupted experiment continues."""
    digest = settings_digest(settings)
    for saved in sorted(out.glob("seed*/*/record.json")):
        run = saved.parent.relative_to(out)
        try:
            record = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"output_dir: {saved} is damaged ({type(e).__name__}); "
                             f"move it away to rerun {run}") from None
        theirs = record.get("settings", {}) if isinstance(record, dict) else {}
        if not isinstance(record, dict) or record.get("digest") != digest:
            changed = [f"{k} {theirs.get(k)!r} there, {settings.get(k)!r} now"
                       for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)][:3]
            raise UsageError(f"output_dir: {out} holds runs made with other settings ({run}: "
                             f"{'; '.join(changed) or 'no settings recorded'}); give another --output_dir, or "
                             "those runs' settings to continue them")


def versions() -> dict:
    import torch
    import transformers
    import trl

    from .. import __version__

    return {"r2m": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def run_experiment(experiment, r2m_config, args, *, argv=(), log=print) -> dict:
    """Every arm of every seed, then the report; returns the report's summary."""
    import torch

    from . import report

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars at every arm; ours is the one bar
    started = time.perf_counter()
    out = Path(args.output_dir)
    settings = digest_settings(experiment, r2m_config, args)
    digest = settings_digest(settings)
    check_output_folder(out, settings)  # before anything is written there
    out.mkdir(parents=True, exist_ok=True)
    arms, seeds = experiment.arm_list(), experiment.seed_list()
    setup = build_setup(experiment, args, out, log)
    bar, progress = _progress_callback(len(arms) * len(seeds) * args.max_steps)
    records = []
    try:
        for seed in seeds:
            for arm in arms:
                folder = out / f"seed{seed}" / arm
                saved = folder / "record.json"
                if saved.exists():  # finished with these settings (check_output_folder)
                    records.append(json.loads(saved.read_text()))
                    setup.initial_eval = records[-1]["eval"][0]
                    bar.update(args.max_steps)
                    continue
                progress.name = f"seed {seed} {arm}"
                record = run_arm(setup, experiment, r2m_config, args, seed, arm, folder, progress)
                record.update(digest=digest, settings=settings)
                folder.mkdir(parents=True, exist_ok=True)
                partial = saved.with_suffix(".json.partial")  # a record exists only once complete
                partial.write_text(json.dumps(record, indent=1))
                partial.replace(saved)
                records.append(record)
                torch.manual_seed(0)  # nothing of one run leaks into the next (set_seed reseeds anyway)
    finally:
        bar.close()
    meta = {"command": "r2m experiment " + " ".join(shlex.quote(a) for a in argv), "versions": versions(),
            "preset": experiment.preset, "arms": arms, "seeds": seeds, "max_steps": args.max_steps,
            "settings": {"experiment": dataclasses.asdict(experiment), "r2m": dataclasses.asdict(r2m_config),
                         "trl": {k: getattr(args, k) for k in (
                             "per_device_train_batch_size", "num_generations", "max_completion_length",
                             "temperature", "learning_rate", "beta", "num_iterations", "max_steps")}},
            "rm_fit": setup.rm_fit, "gold_max": GOLD_MAX, "seconds": time.perf_counter() - started}
    summary = report.write_report(records, meta, out)
    log(report.table(summary))
    if report.training_table(summary):
        log("\n" + report.training_table(summary))
    log(f"report: {out}/report.md, report.json, report.csv, report.png; total {time.perf_counter() - started:.0f} s")
    return summary
