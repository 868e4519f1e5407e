"""R2M inside TRL: `R2MGRPOTrainer` and `R2MRLOOTrainer` (docs/design.md §1.4 on TRL's loop).

Both are TRL's own trainers plus `R2MTrainerMixin`, which takes an `R2MRewardModel` and
- captures the policy's last-layer hidden states during the no-grad pi_old pass TRL already
  makes, or makes one extra no-grad forward where TRL makes none (GRPO with `num_iterations=1`
  and no vLLM), counted in `r2m/extra_forwards`;
- scores every completion with the R2M reward at omega(global step, max_steps), handed to TRL
  as its first reward function (`rewards/r2m/...`), so TRL's weights, advantages and logs apply;
  logs the frozen RM's reward, the judge's gold reward, and how both rewards agree with gold and
  with length within each group;
- recaptures the hidden states in the training forwards of the last iteration over the batch
  (with `num_iterations > 1` they are the refreshed policy's), and after that iteration takes one
  GREBT step on the head with the groups of K completions (`r2m.head_update`, exact across
  processes);
- saves the head and its optimizer in TRL's checkpoints and restores them on resume.

Overridden TRL methods, and why (no TrainerCallback fires between the pi_old pass and the
rewards): `_generate` (keep the token ids), `_generate_and_score_completions` (a scoring state
per generation batch; row ids that survive TRL's shuffle), `_get_per_token_logps_and_entropies`
(the backbone hook), `_calculate_rewards` (RTEs, R2M rewards, metrics), `_compute_loss`
(which training forward to recapture), `training_step` (the head update at the end of a
generation cycle), `_save_checkpoint` / `_load_optimizer_and_scheduler` (head state).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import trl
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer, RLOOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from ..capture import HiddenStateCapture, policy_backbone
from ..config import R2MConfig
from ..metrics import pairwise_agreement
from ..head_update import HeadUpdate, broadcast_parameters
from ..reward_model import R2MRewardModel
from ..schedule import omega as omega_schedule

TESTED_TRL = ("1.16",)  # minor versions whose private methods this module overrides; pinned in r2m[trl]
if ".".join(trl.__version__.split(".")[:2]) not in TESTED_TRL:
    warnings.warn(f"r2m.integrations.trl is tested with trl {', '.join(TESTED_TRL)}.x; found {trl.__version__}. "
                  "It overrides TRL internals that may have changed.", stacklevel=2)

HEAD_FILE = "r2m_head.safetensors"
STATE_FILE = "r2m_state.pt"


class R2MReward:
    """The reward TRL sees: hands back the R2M rewards the trainer computed for this batch."""

    __name__ = "r2m"

    def __init__(self):
        self.values: list[float] | None = None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        values, self.values = self.values, None
        if values is None or len(values) != len(prompts):
            raise RuntimeError("the R2M reward is computed by R2MTrainerMixin._calculate_rewards; call it through "
                               "an R2M trainer")
        return values


@dataclass
class _Scoring:
    """One generation batch on this process, from its scoring until its head update.
    input_ids/attention_mask (B, P+C) as TRL lays them out; hidden (B, P+C, D_p)."""
    capture_old_pass: bool
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    rte: torch.Tensor | None = None
    omega: float = 1.0


def read_checkpoint_state(folder) -> dict:
    """The R2M state saved in a TRL checkpoint folder; ValueError when it has none."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {STATE_FILE}: not a checkpoint of an R2M trainer")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(state: dict, folder, mode: str, max_steps: int) -> None:
    """ValueError when the checkpoint was written in another mode or for another schedule length
    (omega depends on max_steps, so a different one would change every reward after the resume)."""
    if state["mode"] != mode:
        raise ValueError(f"{folder} was written in mode {state['mode']!r}; this run is {mode!r}")
    if state["max_steps"] != max_steps:
        raise ValueError(f"{folder} was written for max_steps={state['max_steps']} (omega's schedule length); "
                         f"this run has max_steps={max_steps}")


class R2MTrainerMixin:
    """The R2M part of `R2MGRPOTrainer` and `R2MRLOOTrainer`; see the module docstring.

    reward_model: an R2MRewardModel whose head reads the policy's hidden size. r2m_config: the
    R2M section (mode, head; its omega_floor and head_backend are set on reward_model.head).
    judge: optional, a function in TRL's reward-function form (prompts=, completions=,
    completion_ids=, dataset columns as keywords) -> list of floats, a gold reward that is logged (`r2m/gold_reward`), never optimised. reward_funcs: further TRL
    reward functions, after the R2M reward (weights in `args.reward_weights`, R2M's first).
    """

    def __init__(self, model, reward_model: R2MRewardModel, args=None, *, r2m_config: R2MConfig | None = None,
                 judge=None, reward_funcs=None, **kwargs):
        if not isinstance(reward_model, R2MRewardModel):
            raise TypeError(f"reward_model must be an R2MRewardModel; got {type(reward_model).__name__}")
        self.r2m_config = r2m_config if r2m_config is not None else R2MConfig()
        self.r2m_config.validate()
        self.reward_model, self.judge = reward_model, judge
        self._r2m_reward = R2MReward()
        extra = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]
        super().__init__(model, reward_funcs=[self._r2m_reward, *extra], args=args, **kwargs)

        policy_dim = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        if reward_model.head.k_proj.in_features != policy_dim:
            raise ValueError(f"reward_model's head reads hidden states of size {reward_model.head.k_proj.in_features}; "
                             f"the policy's hidden size is {policy_dim}")
        self._check_save_steps()
        self.r2m_config.configure_head(reward_model.head)
        reward_model.to(self.accelerator.device)
        broadcast_parameters(reward_model.head)
        self.head_update = HeadUpdate(reward_model, self.r2m_config)
        self._r2m_scoring: _Scoring | None = None
        self._r2m_generated = None
        self._r2m_capture_rows: torch.Tensor | None = None
        self._r2m_extra_forwards = 0

    # schedule ----------------------------------------------------------------------------------

    @property
    def _generate_every(self) -> int:
        """Micro-steps (training_step calls) per generation batch, all iterations included."""
        return self.args.steps_per_generation * self.num_iterations

    def _check_save_steps(self) -> None:
        """A checkpoint must fall between generation cycles: the batch in flight (its
        completions and its pending head update) is not saved."""
        cycle, gas = self._generate_every, self.args.gradient_accumulation_steps
        if self.args.save_strategy != "steps" or cycle % gas:
            return
        cycle_steps = cycle // gas
        if self.args.save_steps >= 1 and int(self.args.save_steps) % cycle_steps:
            raise ValueError(f"save_steps ({self.args.save_steps}) must be a multiple of the optimizer steps per "
                             f"generation batch ({cycle_steps} = steps_per_generation x num_iterations / "
                             "gradient_accumulation_steps), so that a resumed run continues exactly")

    def _r2m_omega(self) -> float:
        return omega_schedule(self.state.global_step, max(1, self.state.max_steps), self.reward_model.head.omega_floor)

    def _trl_makes_old_logps_pass(self) -> bool:
        raise NotImplementedError

    # capture -----------------------------------------------------------------------------------

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._r2m_generated = (result[0], result[1])  # prompt ids, completion ids (lists)
        return result

    def _generate_and_score_completions(self, inputs):
        pending = self._r2m_scoring  # an evaluation may come while a training batch awaits its head step
        self._r2m_scoring = _Scoring(capture_old_pass=self.r2m_config.reads_hidden_states
                                     and self._trl_makes_old_logps_pass())
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:  # row ids follow the rows through TRL's shuffle and split
            output["r2m_row"] = torch.arange(len(inputs), device=self.accelerator.device)
        else:
            self._r2m_scoring = pending
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        scoring, rows = self._r2m_scoring, self._r2m_capture_rows
        for_scoring = scoring is not None and scoring.capture_old_pass
        if not for_scoring and rows is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, **kwargs)
        self._r2m_capture_rows = None
        with HiddenStateCapture(policy_backbone(model)) as capture:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             batch_size, **kwargs)
        if for_scoring:  # the first call of a scoring is the pi_old pass (TRL makes the reference pass after it)
            scoring.capture_old_pass = False
            scoring.input_ids, scoring.attention_mask, scoring.hidden = input_ids, attention_mask, capture.hidden
        else:
            scoring.hidden[rows] = capture.hidden.to(scoring.hidden.dtype)
        return out

    def _generated_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the batch just generated, laid out as TRL lays it out:
        left-padded prompts, right-padded completions, truncated completions masked if asked."""
        prompt_ids, completion_ids = self._r2m_generated
        device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id

        def padded(rows, value, side):
            return pad(rows, padding_value=value, padding_side=side, pad_to_multiple_of=self.pad_to_multiple_of).to(device)

        prompts = [torch.tensor(ids) for ids in prompt_ids]
        completions = [torch.tensor(ids) for ids in completion_ids]
        prompt_mask = padded([torch.ones_like(t) for t in prompts], 0, "left")
        completion_mask = padded([torch.ones_like(t) for t in completions], 0, "right")
        if self.mask_truncated_completions:
            ends = [*self.eos_token_ids, pad_id]
            truncated = torch.tensor([ids[-1] not in ends for ids in completion_ids], device=device)
            completion_mask = completion_mask * (~truncated).unsqueeze(1).int()
        input_ids = torch.cat([padded(prompts, pad_id, "left"), padded(completions, pad_id, "right")], dim=1)
        return input_ids, torch.cat([prompt_mask, completion_mask], dim=1)

    def _forward_for_hidden_states(self, scoring: _Scoring) -> None:
        """TRL made no pi_old pass: make one, no grad, through TRL's own forward (so DDP, FSDP and
        DeepSpeed wrappers apply), with the LM head scoring one token per row."""
        input_ids, attention_mask = self._generated_batch()
        training = self.model.training
        batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
        scoring.capture_old_pass = True
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, 1, batch_size)
        self._r2m_extra_forwards += 1

    # rewards -----------------------------------------------------------------------------------

    def _log_mean(self, name: str, values: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(self.accelerator.gather(values.float().reshape(-1)).mean().item())

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        scoring = self._r2m_scoring
        device = self.accelerator.device
        if self.r2m_config.reads_hidden_states and scoring.hidden is None:
            self._forward_for_hidden_states(scoring)
        if scoring.input_ids is None:  # static mode runs no policy forward; the RM may reuse its tokens
            scoring.input_ids, scoring.attention_mask = self._generated_batch()
        rm_ids, rm_mask = self.reward_model.rm_inputs(prompts, completions, input_ids=scoring.input_ids,
                                                      attention_mask=scoring.attention_mask,
                                                      policy_tokenizer=self._tokenizer)
        with self.accelerator.autocast():
            scoring.rte = self.reward_model.reward_token_embeddings(rm_ids, rm_mask)
        scoring.omega = self._r2m_omega()
        rewards = self.head_update.rewards(scoring.rte, scoring.hidden, scoring.attention_mask, scoring.omega)
        self._r2m_reward.values = rewards.tolist()

        rm_rewards = self.reward_model.static_reward(scoring.rte)
        self._log_mean("r2m/rm_reward", rm_rewards)
        self._log_mean("r2m/omega", torch.tensor([scoring.omega], device=device))
        self._log_mean("r2m/extra_forwards", torch.tensor([float(self._r2m_extra_forwards)], device=device))
        gold = None
        if self.judge is not None:
            columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
            gold = self.judge(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **columns)
            gold = torch.tensor([float(g) for g in gold], device=device)
            self._log_mean("r2m/gold_reward", gold)
        if self.model.training:
            lengths = torch.tensor([float(len(ids)) for ids in completion_ids_list], device=device)
            self._log_agreement(scoring, rewards, rm_rewards, gold, lengths)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _log_agreement(self, scoring: _Scoring, rewards, rm_rewards, gold, lengths) -> None:
        """Within-group pairwise agreement of the reward optimised and of the frozen RM with the
        gold reward (when there is a judge) and with the completion length, over the whole
        gathered batch; and, when the reward reads hidden states, the head's share of the
        within-group reward spread, sd(head term) / (sd(head term) + sd(RM term)) averaged
        over groups (docs/design.md §1.2 for the two terms)."""
        gather, k = self.accelerator.gather, self.num_generations
        columns = {"r2m/agree_length": (rewards, lengths), "r2m/rm_agree_length": (rm_rewards, lengths)}
        if gold is not None:
            columns.update({"r2m/agree_gold": (rewards, gold), "r2m/rm_agree_gold": (rm_rewards, gold)})
        for name, (scores, truth) in columns.items():
            fraction, pairs = pairwise_agreement(gather(scores.float()), gather(truth.float()), k)
            if pairs:
                self._metrics["train"][name].append(fraction)
        if self.r2m_config.reads_hidden_states:
            head, rm = (gather(t) for t in self.head_update.reward_terms(scoring.rte, scoring.hidden,
                                                                         scoring.attention_mask, scoring.omega))
            spread_head, spread_rm = head.view(-1, k).std(-1), rm.view(-1, k).std(-1)
            total = spread_head + spread_rm
            if bool((total > 0).any()):
                self._metrics["train"]["r2m/head_share"].append((spread_head / total)[total > 0].mean().item())

    # head update -------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        position = self._step % self._generate_every
        last_iteration = position >= self.args.steps_per_generation * (self.num_iterations - 1)
        scoring = self._r2m_scoring
        if (self.model.training and scoring is not None and scoring.hidden is not None and last_iteration
                and "r2m_row" in inputs):
            self._r2m_capture_rows = inputs["r2m_row"]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._r2m_capture_rows = None

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self._generate_every == 0 and self._r2m_scoring is not None:
            scoring, self._r2m_scoring = self._r2m_scoring, None
            if self.r2m_config.uses_head:
                result = self.head_update.step(scoring.rte, scoring.hidden, scoring.attention_mask, scoring.omega,
                                               self.num_generations)
                self._metrics["train"]["r2m/grebt_loss"].append(result["loss"])
                self._metrics["train"]["r2m/update_ms"].append(result["ms"])
        return loss

    # checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.reward_model.head.state_dict().items()},
                  os.path.join(folder, HEAD_FILE))
        torch.save({"mode": self.r2m_config.mode, "max_steps": self.state.max_steps,
                    "extra_forwards": self._r2m_extra_forwards,
                    "optimizer": self.head_update.optimizer.state_dict()}, os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        from safetensors.torch import load_file

        state = read_checkpoint_state(checkpoint)
        check_resumable(state, checkpoint, self.r2m_config.mode, self.state.max_steps)
        device = self.accelerator.device
        self.reward_model.head.load_state_dict(load_file(os.path.join(checkpoint, HEAD_FILE), device=str(device)))
        self.head_update.optimizer.load_state_dict(state["optimizer"])
        self._r2m_extra_forwards = state["extra_forwards"]


class R2MGRPOTrainer(R2MTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer trained against an R2M reward model: R2MGRPOTrainer(model, reward_model,
    args=GRPOConfig(...), r2m_config=R2MConfig(...), train_dataset=..., judge=None, ...)."""

    def _trl_makes_old_logps_pass(self) -> bool:
        # GRPOTrainer._generate_and_score_completions' own condition for its pi_old pass
        return (self.args.gradient_accumulation_steps % self._generate_every != 0
                or (self.use_vllm and self.vllm_importance_sampling_correction))


class R2MRLOOTrainer(R2MTrainerMixin, RLOOTrainer):
    """TRL's RLOOTrainer trained against an R2M reward model; arguments as R2MGRPOTrainer's."""

    def _trl_makes_old_logps_pass(self) -> bool:
        return True  # RLOOTrainer always computes pi_old's log-probs
