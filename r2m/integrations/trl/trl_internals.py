"""Every place the R2M trainers depend on TRL's (and transformers') internals.

Read from trl 1.16.0 (`trl/trainer/grpo_trainer.py`; RLOOTrainer has the same method names and
the same order of passes) and transformers 5.24.0. Upgrading TRL means checking this file
against the new source: each entry says what R2M relies on. Nothing else in the package names
a private TRL method or attribute.

`TRLOverrides` holds the private methods R2M hooks into. No TrainerCallback fires between TRL's
no-grad pi_old pass and its rewards, so these have to be overrides; each one forwards to one
`_r2m_*` method of R2MTrainerMixin (trainers.py), where the R2M logic lives.
"""

from __future__ import annotations

import functools
import warnings

import torch
import trl
from trl.models.utils import disable_gradient_checkpointing

from ...tokens import generated_layout

TESTED_TRL = ("1.16",)  # minor versions this file was read from; pinned in r2m[trl]
if ".".join(trl.__version__.split(".")[:2]) not in TESTED_TRL:
    warnings.warn(f"r2m.integrations.trl is tested with trl {', '.join(TESTED_TRL)}.x; found {trl.__version__}. "
                  "It overrides TRL internals that may have changed.", stacklevel=2)

ROW_KEY = "r2m_row"  # the key of the row ids R2M adds to TRL's generation batch


class TRLOverrides:
    """The TRL methods R2M overrides, each a call of TRL's own plus one R2M hook."""

    def _generate(self, prompts):
        # trl 1.16.0: returns (prompt_ids, completion_ids, ...), lists of token ids per row, the
        # only place both are at hand; R2M lays out TRL's batch from them when TRL makes no
        # policy forward before the rewards.
        result = super()._generate(prompts)
        self._r2m_generated(result[0], result[1])
        return result

    def _generate_and_score_completions(self, inputs):
        # trl 1.16.0: every tensor of the returned dict is shuffled and split along the batch
        # with the others (shuffle_sequence_dict, split_tensor_dict), and _compute_loss ignores
        # keys it does not know, so a row-id tensor follows each row into the training steps.
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            output[ROW_KEY] = torch.arange(len(inputs), device=self.accelerator.device)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        # trl 1.16.0: every forward of the policy (pi_old, the PEFT reference pass, training)
        # and of the reference model goes through here, with a fused LM head that returns no
        # hidden states: R2M wraps the call in a hook on the policy's backbone. The policy's
        # forwards pass `self.model`, the reference model's `self.ref_model`. In the pi_old and
        # training passes logits_to_keep is the completion block's width (completion_ids.size(1)),
        # so the completions start at column input_ids.size(1) - logits_to_keep.
        forward = functools.partial(super()._get_per_token_logps_and_entropies, model, input_ids, attention_mask,
                                    logits_to_keep, batch_size, **kwargs)
        return self._r2m_policy_forward(model is self.model, model, input_ids, attention_mask,
                                        input_ids.size(1) - logits_to_keep, forward)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # trl 1.16.0: called once per generation batch after TRL's no-grad passes, before its
        # reward functions run (the R2M reward function hands back what _r2m_score computed).
        self._r2m_score(inputs, prompts, completions, completion_ids_list)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _compute_loss(self, model, inputs):
        # trl 1.16.0: the training forward of one micro-batch, inside training_step; its rows'
        # hidden states refresh the batch's for the head update.
        self._r2m_capture_rows = self._r2m_rows_to_recapture(inputs.get(ROW_KEY))
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._r2m_capture_rows = None

    def training_step(self, model, inputs, num_items_in_batch):
        # trl 1.16.0: counts the micro-step (`_step`) after its forward and backward; the R2M
        # metrics of the step's generation batch are logged at the end of each optimizer step,
        # and the head update follows the last micro-step that uses the batch.
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._r2m_micro_step_done(ends_optimizer_step(self))
        if micro_step(self) % micro_steps_per_generation(self.args) == 0:
            self._r2m_generation_batch_done()
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint):
        # transformers 5.24.0: the one place that has the checkpoint folder on resume (after
        # `resume_from_checkpoint=True` is resolved and the trainer state, max_steps included,
        # is loaded) before the first step; no callback event gets the folder.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._r2m_load_checkpoint(checkpoint)


def micro_step(trainer) -> int:
    """trl 1.16.0's `_step`: the training_step calls completed (each one micro-batch); inside a
    training_step's forward it is the index of the current one. Its generation schedule is read
    from it, so the head update is too."""
    return trainer._step


def ends_optimizer_step(trainer) -> bool:
    """Whether the training_step just completed ends an optimizer step: trl 1.16.0's own test
    where it logs `step_time` (`_step % current_gradient_accumulation_steps == 0`)."""
    return trainer._step % trainer.current_gradient_accumulation_steps == 0


def micro_steps_per_generation(args) -> int:
    """training_step calls one generation batch serves, all iterations over it included (trl
    1.16.0's `generate_every` in _prepare_inputs: TRL generates when _step reaches a multiple);
    `args` is the trainer's GRPOConfig or RLOOConfig."""
    return args.steps_per_generation * args.num_iterations


def reference_pass_runs_the_policy(trainer) -> bool:
    """trl 1.16.0: with beta != 0 and no ref_model (a PEFT policy), the reference log-probs come
    from the policy with its adapter off, after the pi_old pass; that forward of `self.model` is
    not pi_old's, so it must not be taken for it."""
    return trainer.args.beta != 0.0 and trainer.ref_model is None


def policy_forward(trainer, input_ids, attention_mask) -> None:
    """One no-grad forward of the policy through TRL's own (so DDP, FSDP and DeepSpeed wrappers
    apply), the LM head scoring one token per row, batched as TRL batches its pi_old pass; with
    gradient checkpointing off as TRL turns it off for its no-grad passes."""
    training = trainer.model.training
    batch_size = trainer.args.per_device_train_batch_size if training else trainer.args.per_device_eval_batch_size
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 1, batch_size)


def generated_batch(trainer, prompt_ids, completion_ids) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion_start) of a generated batch, laid out as trl
    1.16.0's _generate_and_score_completions lays it out for its forwards
    (r2m.tokens.generated_layout, to `pad_to_multiple_of`), truncated completions (no EOS or pad
    at the end) masked out when `mask_truncated_completions`; the completions start at column
    completion_start (the prompt block's width)."""
    pad_id = tokenizer(trainer).pad_token_id
    truncated = None
    if trainer.mask_truncated_completions:
        ends = [*trainer.eos_token_ids, pad_id]
        truncated = [ids[-1] not in ends for ids in completion_ids]
    input_ids, attention_mask, completion_start = generated_layout(prompt_ids, completion_ids, pad_id,
                                                                   trainer.pad_to_multiple_of, truncated)
    device = trainer.accelerator.device
    return input_ids.to(device), attention_mask.to(device), completion_start


def chat_template_kwargs(trainer) -> dict:
    """trl 1.16.0's `chat_template_kwargs` (args.chat_template_kwargs or {}): what its reward
    path passes to a reward model tokenizer's chat template."""
    return trainer.chat_template_kwargs


def tokenizer(trainer):
    """trl 1.16.0's `_tokenizer`: the policy's tokenizer, also when processing_class is a processor."""
    return trainer._tokenizer


def log_metric(trainer, name: str, value: float) -> None:
    """Append to trl 1.16.0's `_metrics[mode][name]`, which TRL averages into each log entry
    (train: the optimizer steps since the last entry) or into the evaluation's metrics (eval,
    with its `eval_` prefix)."""
    trainer._metrics["train" if trainer.model.training else "eval"][name].append(value)


def log_count(trainer, name: str, value: int) -> None:
    """Set trl 1.16.0's `_metrics[mode][name]` to this one value, as TRL logs its own running
    count `num_tokens`: the next log entry holds the count, not an average over its window."""
    trainer._metrics["train" if trainer.model.training else "eval"][name] = [float(value)]
