"""`r2m train`: with no model given, the embedded demo (SmolLM2-135M-Instruct, a biased RM,
static vs R2M side by side); with --policy and --reward-model, a training run on your models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = ("Train a policy against a real-time aligned reward model. With no --policy, runs the "
        "embedded demo: SmolLM2-135M-Instruct trained against a deliberately biased reward model, "
        "once with the static RM and once with R2M, ending with a table and a plot.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import R2MConfig

    parser.add_argument("--config", metavar="YAML", help="R2MConfig values from a YAML file (flags override)")
    parser.add_argument("--policy", help="policy: a transformers causal-LM folder (omit for the demo)")
    parser.add_argument("--reward-model", help="RM: a transformers sequence-classification folder (one label)")
    parser.add_argument("--prompts", help="prompts: a text file, one per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    parser.add_argument("--tiny", action="store_true",
                        help="demo with a tiny random-weight model instead of SmolLM2 (a smoke run in seconds)")
    R2MConfig.add_arguments(parser)


def build_config(args):
    """R2MConfig defaults, then (demo only) the demo's defaults for the device the run will use,
    then the YAML file, then the flags. The device is resolved from the YAML file and the flags
    first, so `device: cuda` in the file picks the CUDA demo settings as --device cuda does."""
    from .config import R2MConfig
    from .demo.run import DEMO_CPU, DEMO_CUDA

    from_yaml = R2MConfig.read_yaml(args.config) if args.config else {}
    base = R2MConfig()
    if args.policy is None:
        device = getattr(args, "device", from_yaml.get("device", base.device))
        base = base.replace(**(DEMO_CUDA if str(device).startswith("cuda") else DEMO_CPU))
    return R2MConfig.from_args(args, base.replace(**from_yaml))


def load_prompts(path) -> list[str]:
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [line for line in text.splitlines() if line.strip()]


def run(args) -> int:
    config = build_config(args)
    if args.policy is None:
        if args.resume or args.reward_model or args.prompts:
            raise SystemExit("--resume, --reward-model and --prompts need --policy (the demo takes none)")
        from .demo.run import run_demo

        run_demo(config, tiny=args.tiny)
        return 0
    if not (args.reward_model and args.prompts):
        raise SystemExit("--policy needs --reward-model and --prompts")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .reward_model import R2MRewardModel
    from .trainer import R2MTrainer

    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    rm_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    rm = R2MRewardModel.from_sequence_classifier(
        rm_model, policy.config.hidden_size, tokenizer=AutoTokenizer.from_pretrained(args.reward_model),
        attn_dim=config.attn_dim, num_heads=config.num_heads, omega_floor=config.omega_floor)
    trainer = R2MTrainer(config, policy, tokenizer, rm, load_prompts(args.prompts))
    if args.resume:
        trainer.load_checkpoint()
    trainer.train()
    print(f"metrics: {trainer.metrics_path}; checkpoint: {trainer.output_dir / 'checkpoint'}")
    return 0
