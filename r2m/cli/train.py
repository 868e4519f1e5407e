"""`r2m train`: R2M training on TRL (R2MRLOOTrainer or R2MGRPOTrainer).

Settings come from TRL's own parser (TrlParser): TRL's config (RLOOConfig or GRPOConfig, by
--trainer), the R2M section (R2MConfig) and the command's own arguments, from a YAML file
(--config) and flags, flags last. The demo is `r2m experiment`. A bad value is one line naming
the field, exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import message_line
from .settings import (DEVICES, HELP_ALL, UsageError, check_backend_runs, check_yaml, choice, help_requested,
                       make_parser, prescan, runs_on_cpu, short_help)

HELP = ("Train a policy with TRL against a real-time aligned reward model (the demo and the paired "
        "experiment are `r2m experiment`).")

TRAINERS = ("rloo", "grpo")

# The TRL settings the short help lists (a test checks each is a field of both TRL configs)
TRL_OPTIONS = {
    "output_dir": "where checkpoints and trainer_state.json (the log history) are written",
    "max_steps": "optimizer steps to train, also omega's schedule length (-1: num_train_epochs instead)",
    "num_train_epochs": "passes over the prompts, when max_steps is -1",
    "learning_rate": "the policy's learning rate (the head's: --head_learning_rate)",
    "per_device_train_batch_size": "completions per process and micro-step",
    "gradient_accumulation_steps": "micro-steps per optimizer step",
    "num_generations": "completions per prompt: the group R2M compares (at least 2)",
    "max_completion_length": "the longest completion, in tokens",
    "temperature": "the sampling temperature",
    "num_iterations": "optimizer steps over each generation batch (2: the head update reads the updated policy)",
    "beta": "the KL coefficient against the reference policy",
    "logging_steps": "a log row every N optimizer steps",
    "report_to": "where the log also goes: none, tensorboard, wandb, ...",
    "save_strategy": "when to write a checkpoint: no, steps, epoch",
    "save_steps": "a checkpoint every N optimizer steps: a multiple of the steps per generation batch",
    "seed": "the seed of the run, the head's initialisation included",
    "bf16": "train in bfloat16 (TRL's default; needs a GPU)",
    "use_vllm": "generate with vLLM (with --vllm_mode colocate or server)",
}


@dataclass
class TrainArguments:
    """What `r2m train` itself needs beside TRL's config and the R2M section."""

    _argument_group_name = "r2m train"

    policy: str | None = field(default=None, metadata={
        "help": "policy: a transformers causal-LM folder (or hub id)"})
    reward_model: str | None = field(default=None, metadata={
        "help": "reward model: a transformers sequence-classification folder (or hub id) with one label"})
    prompts: str | None = field(default=None, metadata={
        "help": "prompts: a text file (one per line, sent as the user turn when the tokenizer has a chat "
                "template) or .jsonl with a 'prompt' field (text or TRL's list of messages)"})
    trainer: str = field(default="rloo", metadata={"help": "TRL trainer", "choices": list(TRAINERS)})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu or cuda; several GPUs: launch with `accelerate launch`",
        "choices": list(DEVICES)})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint-N in output_dir"})


def parse(argv: list[str]):
    """(TrainArguments, R2MConfig, RLOOConfig or GRPOConfig) from the YAML file and the flags."""
    from ..config import R2MConfig

    from_yaml, picked = prescan(argv, ("trainer", "device", "policy", "num_generations", "save_steps"))
    trainer = choice("trainer", picked["trainer"], TRAINERS)
    defaults = {"report_to": "none", "logging_steps": 1}
    if help_requested(argv) == "short":
        print(short_help("r2m train", HELP, (TrainArguments, R2MConfig), defaults, TRL_OPTIONS))
        sys.exit(0)
    from trl import GRPOConfig, RLOOConfig
    try:
        num_generations = int(picked["num_generations"])
    except (TypeError, ValueError):  # not given, or not an integer: argparse reports the latter
        num_generations = None
    if num_generations is not None and num_generations < 2:  # TRL's own check names no flag
        raise UsageError(f"num_generations must be at least 2: R2M compares the completions of one prompt; "
                         f"got {num_generations}")
    on_cpu = runs_on_cpu(picked["device"])
    sections = (TrainArguments, R2MConfig, RLOOConfig if trainer == "rloo" else GRPOConfig)
    check_yaml(from_yaml, sections)
    if on_cpu:  # TRL turns bf16 on by default, which needs a GPU
        defaults.update(use_cpu=True, bf16=False)
    argv = ["--help" if arg == HELP_ALL else arg for arg in argv]  # TrlParser's help is every option
    script, r2m_config, args = make_parser(sections, defaults, "r2m train", HELP).parse_args_and_config(argv)
    check_backend_runs(r2m_config, on_cpu)
    if picked["save_steps"] is not None:  # the trainer aligns only TRL's default; this one the user chose
        from ..integrations.trl.trainers import SaveStepsError, checked_save_steps

        try:
            checked_save_steps(args, args.max_steps, given=True)
        except SaveStepsError as e:
            raise UsageError(str(e)) from None
    return script, r2m_config, args


def _local_or_hub(name: str, value: str) -> str:
    """`value` as a local folder, or as a hub id (`name` or `org/name`) when no such folder
    exists; a path that can only be local and does not exist is an error, not a hub lookup."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UsageError(f"{name}: {value} is a file; expected a model folder")
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value:
        raise UsageError(f"{name}: no such folder: {value}")
    return value


def _is_prompt(value) -> bool:
    """Text, or TRL's conversational form: a non-empty list of {"role": text, "content": text}."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def load_prompts(path: str, tokenizer) -> list:
    """Prompts in TRL's dataset form: conversational when the tokenizer has a chat template."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"prompts: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"prompts: {path} is not UTF-8 text (byte {e.start})") from None
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"prompts: {path} line {number} is not a JSON object with a 'prompt' field") from None
            if not _is_prompt(prompt):
                raise UsageError(f"prompts: {path} line {number}: 'prompt' must be text or a list of messages "
                                 f"({{\"role\": ..., \"content\": text}}); got {json.dumps(prompt)[:60]}")
            prompts.append(prompt)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
        if getattr(tokenizer, "chat_template", None):
            prompts = [[{"role": "user", "content": p}] for p in prompts]
    if not prompts:
        raise UsageError(f"prompts: {path} has no prompts")
    return prompts


def _load(name: str, loader, value: str):
    try:
        return loader(value)
    except (OSError, ValueError) as e:
        raise UsageError(f"{name}: cannot load {value}: {message_line(e)}") from None


def load_model(name: str, auto_class, source: str, **kwargs):
    """auto_class.from_pretrained(source, **kwargs), or a UsageError naming `name`, the folder
    and what is wrong: weights that cannot be read (a truncated or garbled file), or weights
    that do not fit config.json, where transformers would re-initialise the tensors of another
    shape, or lacking from the weights, at random and only warn."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of the keys: the error below names the first
    try:
        model, info = auto_class.from_pretrained(source, ignore_mismatched_sizes=True, output_loading_info=True,
                                                 **kwargs)
    except SafetensorError as e:
        raise UsageError(f"{name}: {_unreadable_weights(source) or source} is damaged ({e})") from None
    except (pickle.UnpicklingError, EOFError):  # a pytorch_model.bin
        raise UsageError(f"{name}: the weights in {source} are damaged (not a readable PyTorch checkpoint)") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{name}: cannot load {source}: {message_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["mismatched_keys"]:
        mismatched = sorted(info["mismatched_keys"])
        key, in_weights, by_config = mismatched[0]
        raise UsageError(f"{name}: the weights in {source} do not fit its config.json: {key} is {tuple(in_weights)} "
                         f"in the weights, {tuple(by_config)} by config.json ({len(mismatched)} tensors differ)")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UsageError(f"{name}: the weights in {source} lack {len(missing)} of the tensors its config.json "
                         f"defines ({missing[0]}, ...), which would start at random")
    return model


def _unreadable_weights(source: str) -> str | None:
    """The first .safetensors file in the local folder `source` whose header cannot be read."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            return str(path)
    return None


def check_resume(output_dir: str, r2m_config, max_steps: int) -> str:
    """The checkpoint to resume from; UsageError when there is none or it cannot continue this run."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..integrations.trl import check_resumable, read_checkpoint_state, read_head_weights

    def check(folder):
        state = read_checkpoint_state(folder)
        read_head_weights(folder)
        # max_steps <= 0 (a length in epochs) is only known once TRL has the data; the trainer checks it
        check_resumable(state, folder, r2m_config.mode, max_steps if max_steps > 0 else state["max_steps"], r2m_config)

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise UsageError(f"resume: no checkpoint-N folder in {output_dir}")
    try:
        check(last)
    except ValueError as e:
        raise UsageError(f"resume: {e}{_earlier_intact(output_dir, last, check)}") from None
    return last


def _earlier_intact(output_dir: str, last: str, check) -> str:
    """The hint after a checkpoint that cannot continue the run: the newest earlier one that can."""
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.join(output_dir, name) != last)
    for _, name in reversed(steps):
        try:
            check(os.path.join(output_dir, name))
        except ValueError:
            continue
        return f"; {name} is intact: move {os.path.basename(last)} out of {output_dir} to resume from {name}"
    return ""


def train(script: TrainArguments, r2m_config, args) -> int:
    from datasets import Dataset
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              set_seed)

    from r2m_kernels import BackendUnavailableError

    from ..integrations.trl import R2MGRPOTrainer, R2MRLOOTrainer
    from ..integrations.trl.trainers import REWARD_MODEL_FOLDER, SaveStepsError
    from ..reward_model import R2MRewardModel

    if not (script.policy and script.reward_model and script.prompts):
        raise UsageError("policy: r2m train needs --policy, --reward_model and --prompts (the demo is `r2m experiment`)")
    policy = _local_or_hub("policy", script.policy)
    rm_source = _local_or_hub("reward_model", script.reward_model)
    policy_config = _load("policy", AutoConfig.from_pretrained, policy)
    tokenizer = _load("policy", lambda p: AutoTokenizer.from_pretrained(p, padding_side="left"), policy)
    prompts = load_prompts(script.prompts, tokenizer)
    checkpoint = check_resume(args.output_dir, r2m_config, args.max_steps) if script.resume else None
    # TRL loads the policy itself; loaded onto the meta device, it shows how its weights fit
    # config.json without reading them.
    load_model("policy", AutoModelForCausalLM, policy, device_map="meta", use_kernels=False)
    rm_model = load_model("reward_model", AutoModelForSequenceClassification, rm_source, num_labels=1)
    set_seed(args.seed)  # the head's initialisation, like everything after it, follows the seed
    rm = R2MRewardModel.from_sequence_classifier(
        rm_model, policy_config.get_text_config().hidden_size,
        config=r2m_config, tokenizer=_load("reward_model", AutoTokenizer.from_pretrained, rm_source))
    trainer_cls = R2MRLOOTrainer if script.trainer == "rloo" else R2MGRPOTrainer
    try:
        trainer = trainer_cls(policy, rm, args=args, r2m_config=r2m_config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
    except (ValueError, BackendUnavailableError) as e:  # TRL's and R2M's checks of the settings together
        raise UsageError(message_line(e)) from None
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except SaveStepsError as e:  # a save_steps ratio of a length in epochs, checked once that length is known
        raise UsageError(str(e)) from None
    trainer.save_state()
    trainer.save_model()  # the policy in output_dir, the R2M reward model in output_dir/r2m_reward_model
    if trainer.accelerator.is_main_process:
        out = Path(args.output_dir)
        print(f"policy: {out}; reward model: {out / REWARD_MODEL_FOLDER} (R2MRewardModel.from_pretrained)")
        print(f"metrics: {out / 'trainer_state.json'} (log_history)")
    # Several processes: destroy the process group while the interpreter is whole (accelerate's
    # end_training). Left to the interpreter's exit, gloo's threads abort a rank now and then
    # ("terminate called without an active exception", exit status 1 after a finished run).
    trainer.accelerator.end_training()
    return 0


@contextlib.contextmanager
def _no_empty_output_dir(output_dir: str):
    """On an error, remove output_dir if this run created it and wrote nothing in it (the
    Trainer creates it in its constructor, before R2M's checks and TRL's run)."""
    existed = os.path.exists(output_dir)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(output_dir):
            for folder, _, _ in sorted(os.walk(output_dir), reverse=True):  # deepest first; rmdir keeps any file
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise


def main(argv: list[str]) -> int:
    from ..head_update import NonFiniteError

    try:
        script, r2m_config, args = parse(argv)
        with _no_empty_output_dir(args.output_dir):
            return train(script, r2m_config, args)
    except UsageError as e:
        print(f"r2m train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # training stopped: no checkpoint holds the non-finite head
        print(f"r2m train: stopped: {e}", file=sys.stderr)
        return 1
