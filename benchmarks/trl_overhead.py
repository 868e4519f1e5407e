"""What R2M costs inside TRL, per optimizer step: R2MGRPOTrainer against TRL's own GRPOTrainer
with the same sequence-classification RM as its reward function (same policy, prompts, seed and
settings), measured side by side in one run.

Each training run is a fresh process (so each has its own peak memory and neither inherits the
other's warm caches); runs come in pairs whose order alternates, (plain, r2m), (r2m, plain), ...,
so that a machine's drift falls on both arms alike. A run's step time is the median, over its
generation batches after the first, of the wall clock from the end of one batch's last optimizer
step to the next one's, per step (generation, rewards, the policy's updates and R2M's head update
all included; a batch serves num_iterations steps). Printed and written to --out (JSON):
per pair the ratio r2m / plain of the step times, their median and range; each arm's peak
memory (GPU: torch's peak allocation; CPU: the process's peak RSS); and where R2M's extra time
goes: the extra no-grad policy forward R2M makes where TRL makes no pi_old pass (GRPO with
num_iterations 1 and beta 0; none with --num_iterations 2) and the head update, per step.

usage: python benchmarks/trl_overhead.py --policy DIR [--reward_model DIR] [--pairs 5] [--steps 8]
           [--num_iterations 1] [--max_completion_length 16] [--device auto|cpu|cuda] [--out FILE]
(--reward_model defaults to the policy's folder, loaded as a one-label sequence classifier: a
random score head, which is all the timing needs.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("plain", "r2m")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--policy", required=True, help="a transformers causal-LM folder")
    parser.add_argument("--reward_model", help="a sequence-classification folder (default: the policy's)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating (plain, r2m) pairs of runs")
    parser.add_argument("--steps", type=int, default=8,
                        help="optimizer steps per run (the first generation batch's are not timed)")
    parser.add_argument("--num_iterations", type=int, default=1,
                        help="1: R2M makes an extra no-grad forward per batch; 2: it reads TRL's pi_old pass")
    parser.add_argument("--max_completion_length", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8, help="completions per step (groups of 4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, help="JSON file for the runs and the summary")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one run, in its own process
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.num_iterations < 1 or args.steps < 2 * args.num_iterations:
        parser.error("--pairs and --num_iterations must be >= 1 and --steps at least two generation batches "
                     "(2 x num_iterations: the first is not timed)")
    args.reward_model = args.reward_model or args.policy
    return args


def run_arm(args: argparse.Namespace) -> dict:
    """One training run of `args.arm`; its step times (s, one per generation batch after the
    first), peak memory (MiB) and, for r2m, the time (s) in its extra forwards and head updates."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r2m import R2MConfig, R2MRewardModel
    from r2m.experiment.tasks import PROMPTS
    from r2m.integrations.trl import R2MGRPOTrainer, trl_internals

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    rm_tokenizer = AutoTokenizer.from_pretrained(args.reward_model)
    rm_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    if rm_tokenizer.pad_token is None:
        rm_tokenizer.pad_token = rm_tokenizer.eos_token
    rm_model.config.pad_token_id = rm_tokenizer.pad_token_id
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [[{"role": "user", "content": p}] if chat else p for p in PROMPTS]
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                            num_generations=4, max_completion_length=args.max_completion_length,
                            num_iterations=args.num_iterations, logging_steps=1, save_strategy="no", report_to="none",
                            seed=0, disable_tqdm=True, use_cpu=not cuda, bf16=False, gradient_checkpointing=False)
        dataset = Dataset.from_dict({"prompt": prompts})
        common = dict(args=config, train_dataset=dataset, processing_class=tokenizer)
        spent = {"extra_forward": 0.0, "head_update": 0.0}
        if args.arm == "plain":
            trainer = GRPOTrainer(args.policy, reward_funcs=rm_model, reward_processing_classes=rm_tokenizer, **common)
        else:
            policy_dim = trl_policy_dim(args.policy)
            r2m_config = R2MConfig(attn_dim=64)
            rm = R2MRewardModel.from_sequence_classifier(rm_model, policy_dim, tokenizer=rm_tokenizer, config=r2m_config)
            trainer = R2MGRPOTrainer(args.policy, rm, r2m_config=r2m_config, **common)
            timed(trl_internals, "policy_forward", spent, "extra_forward", cuda)
            timed(trainer.head_update, "step", spent, "head_update", cuda)

        step_ends = []

        class StepEnds(TrainerCallback):
            def on_step_end(self, *_, **__):
                if cuda:
                    torch.cuda.synchronize()
                step_ends.append(time.perf_counter())

        trainer.add_callback(StepEnds())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    batch_ends = step_ends[args.num_iterations - 1::args.num_iterations]
    step_s = [(b - a) / args.num_iterations for a, b in zip(batch_ends, batch_ends[1:])]
    return {"arm": args.arm, "step_s": step_s, "peak_mib": peak / 2**20,
            "extra_forwards": getattr(trainer, "_r2m_extra_forwards", 0), **{f"{k}_s": v for k, v in spent.items()},
            "device": "cuda" if cuda else "cpu"}


def trl_policy_dim(policy: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(policy).get_text_config().hidden_size


def timed(owner, name: str, spent: dict, key: str, cuda: bool) -> None:
    """Wrap owner.name so that the seconds spent in it add up in spent[key]."""
    import torch

    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def summarise(runs: list[dict], steps: int) -> dict:
    """Per pair, the ratio of the r2m run's median step time to the plain run's; their median
    and range; each arm's median peak memory; R2M's extra forward and head update per step (over
    all `steps`)."""
    by_pair = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    median_step = {id(run): statistics.median(run["step_s"]) for run in runs}
    ratios = []
    for first, second in by_pair:
        plain, r2m = (first, second) if first["arm"] == "plain" else (second, first)
        ratios.append(median_step[id(r2m)] / median_step[id(plain)])
    arm_runs = {arm: [run for run in runs if run["arm"] == arm] for arm in ARMS}
    step = {arm: statistics.median(median_step[id(run)] for run in arm_runs[arm]) for arm in ARMS}
    per_step = {key: statistics.median(run[f"{key}_s"] for run in arm_runs["r2m"]) / steps
                for key in ("extra_forward", "head_update")}
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": ratios, "step_s": step, "peak_mib": {arm: statistics.median(r["peak_mib"] for r in arm_runs[arm])
                                                            for arm in ARMS},
            "r2m_extra_s_per_step": step["r2m"] - step["plain"],
            "extra_forward_s_per_step": per_step["extra_forward"], "head_update_s_per_step": per_step["head_update"]}


def report(summary: dict, args: argparse.Namespace, device: str) -> str:
    s = summary
    lines = [f"R2M / plain TRL GRPO, per optimizer step ({device}, {args.pairs} alternating pairs, {args.steps} steps "
             f"each, num_iterations {args.num_iterations}):",
             f"  ratio: median {s['ratio_median']:.3f}, range {s['ratio_min']:.3f} to {s['ratio_max']:.3f} "
             f"(per pair: {', '.join(f'{r:.3f}' for r in s['ratios'])})",
             f"  step: plain {s['step_s']['plain'] * 1e3:.1f} ms, r2m {s['step_s']['r2m'] * 1e3:.1f} ms "
             f"(+{s['r2m_extra_s_per_step'] * 1e3:.1f} ms)",
             f"  of which, per step: extra no-grad forward {s['extra_forward_s_per_step'] * 1e3:.1f} ms, "
             f"head update {s['head_update_s_per_step'] * 1e3:.1f} ms",
             f"  peak memory: plain {s['peak_mib']['plain']:.1f} MiB, r2m {s['peak_mib']['r2m']:.1f} MiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arm is not None:
        print(json.dumps(run_arm(args)))
        return 0
    base = [sys.executable, __file__, "--policy", args.policy, "--reward_model", args.reward_model,
            "--steps", str(args.steps), "--num_iterations", str(args.num_iterations),
            "--max_completion_length", str(args.max_completion_length), "--batch_size", str(args.batch_size),
            "--device", args.device, "--pairs", "1"]
    runs = []
    for pair in range(args.pairs):
        for arm in (ARMS if pair % 2 == 0 else ARMS[::-1]):
            done = subprocess.run([*base, "--arm", arm], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"trl_overhead: the {arm} run of pair {pair + 1} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = summarise(runs, args.steps)
    print(report(summary, args, runs[0]["device"]))
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
