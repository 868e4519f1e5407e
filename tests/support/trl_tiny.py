"""Tiny random Llama policy and RM saved to a folder (TRL loads its reference model from the
policy's folder), and R2M trainers on them: shared by the TRL tests and the two-process script."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

POLICY_DIM, RM_DIM = 32, 24
TIMING_KEYS = ("step_time", "r2m/update_ms", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def save_tiny_models(folder: Path) -> Path:
    """Writes folder/policy (LlamaForCausalLM + tokenizer) and folder/rm
    (LlamaForSequenceClassification, one label); returns folder."""
    from transformers import LlamaForSequenceClassification

    from r2m.experiment.tiny import tiny_llama_config, tiny_policy, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    models = {"policy": tiny_policy(tok, hidden_size=POLICY_DIM),
              "rm": LlamaForSequenceClassification(tiny_llama_config(len(tok), RM_DIM, num_labels=1))}
    for name, model in models.items():
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    (folder / "prompts.txt").write_text("\n".join(["1+2=", "2+2=", "3+1=", "0+3=", "2+1=", "1+1="]) + "\n")
    return folder


def trl_config(kind: str, output_dir, **overrides):
    """A CPU TRL config for the tiny models: 8 completions per step (2 prompts x K = 4)."""
    from trl import GRPOConfig, RLOOConfig

    settings = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=8,
                    num_generations=4, max_completion_length=6, logging_steps=1, report_to="none",
                    save_strategy="no", seed=0, gradient_checkpointing=False, learning_rate=1e-3,
                    disable_tqdm=True)
    settings.update(overrides)
    return (GRPOConfig if kind == "grpo" else RLOOConfig)(**settings)


def make_trainer(models: Path, kind: str, output_dir, mode: str = "r2m", judge=True, eval_prompts=0,
                 head_attends="sequence", **overrides):
    """An R2M trainer on the tiny models (the first `eval_prompts` prompts also as an evaluation
    set); returns (trainer, its R2MRewardModel)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from r2m import R2MConfig, R2MRewardModel
    from r2m.experiment.tiny import tiny_judge_func
    from r2m.integrations.trl import R2MGRPOTrainer, R2MRLOOTrainer

    tok = AutoTokenizer.from_pretrained(models / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(models / "policy")
    rm_model = AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1)
    torch.manual_seed(1)
    r2m_config = R2MConfig(mode=mode, attn_dim=16, num_heads=2, head_learning_rate=1e-2, head_attends=head_attends)
    rm = R2MRewardModel.from_sequence_classifier(rm_model, POLICY_DIM, config=r2m_config)
    prompts = (models / "prompts.txt").read_text().split()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    trainer_cls = R2MGRPOTrainer if kind == "grpo" else R2MRLOOTrainer
    trainer = trainer_cls(policy, rm, args=trl_config(kind, output_dir, **overrides),
                          r2m_config=r2m_config,
                          train_dataset=dataset, eval_dataset=dataset.select(range(eval_prompts)) if eval_prompts else None,
                          processing_class=tok, judge=tiny_judge_func if judge else None)
    return trainer, rm


def metrics(log_history) -> list[dict]:
    """The per-step log entries without wall-clock times."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in log_history if "loss" in row]


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in copy.deepcopy(module).state_dict().items()}
