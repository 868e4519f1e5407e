"""The experiment's measurement on a fixed held-out set (docs/design.md §1.4 for the loop it
watches): a TrainerCallback that, before the first step and every N optimizer steps, samples K
completions per held-out prompt from the current policy with a fixed seed and records the gold
reward, the frozen RM's reward, the reward the run optimises, the KL to the initial policy per
token and the length.

It draws its random numbers inside torch.random.fork_rng with its own seed, so the training's
random streams are exactly what they would be without it: the arms of a seed stay paired.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import TrainerCallback

from ..capture import HiddenStateCapture, policy_backbone
from ..metrics import pairwise_agreement


def completion_log_probs(model, input_ids, attention_mask, prompt_width: int, temperature: float):
    """(hidden (B, P+C, D) last-layer states, log-probs (B, C) of each completion token under
    `model` at `temperature`, TRL's scaling), from one backbone forward called as TRL calls it
    (input_ids and attention_mask)."""
    with HiddenStateCapture(policy_backbone(model)) as capture:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = capture.hidden
    logits = model.get_output_embeddings()(hidden[:, prompt_width - 1:-1]).float() / temperature
    targets = input_ids[:, prompt_width:]
    return hidden, torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class HeldOutEvaluation(TrainerCallback):
    """Measures an R2M trainer's policy on held-out prompts; one row per evaluation in `rows`.

    trainer: an R2M trainer (R2MRLOOTrainer or R2MGRPOTrainer). judge: the gold reward in TRL's
    reward-function form (default: the trainer's). prompts: the
    held-out prompts in the training set's form. reference: the initial policy, frozen (for the
    KL). every: evaluate when the global step is a multiple of it, at step 0 and at the last step. samples: K
    per prompt. seed: the sampling seed, the same at every evaluation and in every arm.

    Each row: step; gold, rm_reward (the frozen RM), reward (the reward the run optimises, at
    this step's omega), kl (per completion token: mean of exp(d) - d - 1, d = log ref - log
    policy, an unbiased and non-negative estimate of KL(policy || reference) at the sampling
    temperature), length (tokens, EOS included); the within-group pairwise agreement of the
    optimised reward and of the frozen RM with gold and with length; digest, a hash of the
    sampled token ids (equal across arms at step 0 when the arms are paired). `initial`: see
    on_train_begin."""

    def __init__(self, trainer, prompts: list, reference, *, every: int, samples: int, seed: int,
                 judge=None, initial: dict | None = None):
        self.judge = judge if judge is not None else trainer.judge
        if self.judge is None:
            raise ValueError("the held-out evaluation needs a judge (its own or the trainer's)")
        self.trainer, self.prompts, self.reference = trainer, list(prompts), reference.eval().requires_grad_(False)
        self.every, self.samples, self.seed = every, samples, seed
        self.initial = initial
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        """Step 0. `initial`, when given, is the step-0 row of another run that started from the
        same policy and reward model (every arm and seed of an experiment): the same samples,
        so the same row, without generating them again."""
        if not self.rows:
            if self.initial is not None:
                self.rows.append(dict(self.initial))
            else:
                self.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            if not self.rows or self.rows[-1]["step"] != state.global_step:
                self.evaluate(state.global_step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        from .models import sample

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        device, args, k = trainer.accelerator.device, trainer.args, self.samples
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                ids, mask, texts, lengths, width = sample(
                    model, trainer.processing_class, self.prompts, k, args.max_completion_length,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
                ids, mask = ids.to(device), mask.to(device)
                hidden, policy_logps = completion_log_probs(model, ids, mask, width, args.temperature)
                _, reference_logps = completion_log_probs(self.reference, ids, mask, width, args.temperature)
                prompts = [p for p in self.prompts for _ in range(k)]
                completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                               for p, t in zip(prompts, texts)]
                gold = torch.tensor([float(g) for g in self.judge(prompts=prompts, completions=completions)])
                rm = trainer.reward_model
                rte = rm.reward_token_embeddings(*rm.rm_inputs(prompts, completions, input_ids=ids,
                                                               attention_mask=mask))
                omega = trainer._r2m_omega()
                head_mask = trainer.head_update.head_mask(mask, width)
                reward = trainer.head_update.rewards(rte, hidden, head_mask, omega).cpu()
                rm_reward = rm.static_reward(rte).cpu()
        finally:
            model.train(was_training)
        valid = mask[:, width:].bool()
        d = (reference_logps - policy_logps)[valid]
        row = {"step": step, "omega": omega, "gold": gold.mean().item(), "rm_reward": rm_reward.mean().item(),
               "reward": reward.mean().item(), "kl": (d.exp() - d - 1).mean().item(),
               "length": lengths.mean().item(),
               "digest": hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16]}
        for name, scores in (("", reward), ("rm_", rm_reward)):
            for truth_name, truth in (("gold", gold), ("length", lengths)):
                row[f"{name}agree_{truth_name}"] = pairwise_agreement(scores, truth, k)[0] if k > 1 else float("nan")
        self.rows.append(row)
        return row
