"""`R2MGRPOTrainer` and `R2MRLOOTrainer`: TRL's trainers plus `R2MTrainerMixin`, the R2M part.

The mixin's state lives in attributes prefixed `_r2m_` (TRL's own names stay TRL's). Each value
that has to cross TRL's calls is set in one place and taken in one place:
- `_r2m_generation` (`_Generation`): set when TRL has generated a batch, taken by the scoring;
  meanwhile it records the policy forwards TRL makes, the first with its hidden states;
- `_r2m_batch` (`_ScoredBatch`): set by the scoring of a training batch, taken by its head
  update at the end of the generation cycle; the last iteration's training forwards refresh its
  hidden states row by row (`_r2m_capture_rows`, set around each training forward);
- `_r2m_batch_metrics`: set by the scoring of a training batch, logged on the row of each
  optimizer step over it (`_r2m_micro_step_done`), cleared at the end of its generation cycle.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from transformers.utils import logging
from trl import GRPOTrainer, RLOOTrainer

from ...capture import HiddenStateCapture, policy_backbone
from ...config import R2MConfig
from ...head import check_head_backend
from ...head_update import HeadUpdate, NonFiniteError, broadcast_parameters
from ...metrics import (completion_attention_mass, max_attention_weight, pairwise_agreement, reranked_share,
                        shared_focus)
from ...reward_model import R2MRewardModel
from ...schedule import omega as omega_schedule
from ...tokens import completion_positions
from . import trl_internals
from .checkpoints import SaveR2MState, load_r2m_state

REWARD_MODEL_FOLDER = "r2m_reward_model"  # save_model's folder for the reward model, inside the policy's

logger = logging.get_logger(__name__)

COUNT_METRICS = ("r2m/extra_forwards",)  # running counts: each log entry holds the count, never an average


class SaveStepsError(ValueError):
    """A save_steps that would put a checkpoint inside a generation batch."""


def optimizer_steps_per_generation(args) -> int:
    """The optimizer steps from one end of a generation batch that is also the end of an
    optimizer step to the next: the steps a checkpoint's save_steps must be a multiple of."""
    micro_steps, accumulation = trl_internals.micro_steps_per_generation(args), args.gradient_accumulation_steps
    return math.lcm(micro_steps, accumulation) // accumulation


def checked_save_steps(args, max_steps: int, *, given: bool) -> tuple[float, str | None]:
    """(the save_steps to use, a note when it differs from args.save_steps). A checkpoint must
    fall between generation batches (the batch in flight, its completions and its pending head
    update, is not saved), so save_steps must be a multiple of the optimizer steps per
    generation batch. A value the user gave (`given`) that is not is a SaveStepsError naming the
    nearest valid ones; TRL's default (500) is aligned to the nearest valid one instead. A ratio
    (save_steps < 1, of max_steps) is checked once max_steps is known (> 0)."""
    if args.save_strategy != "steps" or (args.save_steps < 1 and max_steps <= 0):
        return args.save_steps, None
    every = optimizer_steps_per_generation(args)
    steps = math.ceil(max_steps * args.save_steps) if args.save_steps < 1 else int(args.save_steps)
    if steps % every == 0:
        return args.save_steps, None
    below, above = steps // every * every, (steps // every + 1) * every
    multiple = (f"a multiple of the optimizer steps per generation batch ({every} = steps_per_generation x "
                "num_iterations / gradient_accumulation_steps)")
    if not given:
        aligned = below if below and steps - below <= above - steps else above
        return aligned, (f"save_steps: TRL's default {steps} is not {multiple}, as a checkpoint must be for a resumed "
                         f"run to continue exactly; checkpoints every {aligned} steps instead")
    asked = f"{args.save_steps:g}" + (f" of max_steps {max_steps} = {steps} steps" if args.save_steps < 1 else "")
    nearest = f"{below} or {above}" if below else f"{above}"
    raise SaveStepsError(f"save_steps ({asked}) must be {multiple}, so that a resumed run continues exactly; "
                         f"the nearest valid: {nearest}")

# The head's attention diagnostics (r2m/attn_*) are computed at each training scoring on at most
# this many groups per process (the first ones whole on it), with the torch path: a sample
# that costs about one more head forward on those rows.
ATTENTION_DIAGNOSTIC_GROUPS = 8


class R2MReward:
    """The reward TRL sees: hands back the R2M rewards the trainer computed for this batch."""

    __name__ = "r2m"

    def __init__(self):
        self.values: list[float] | None = None

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        values, self.values = self.values, None
        if values is None or len(values) != len(prompts):
            raise RuntimeError("the R2M reward is computed by R2MTrainerMixin's scoring; call it through "
                               "an R2M trainer")
        return values


@dataclass(frozen=True)
class _PolicyForward:
    """One forward of the policy: its inputs (B, P+C) as TRL laid them out, the column P where
    the completions start, its last-layer hidden states (B, P+C, D_p), detached."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_start: int
    hidden: torch.Tensor


@dataclass(frozen=True)
class _Generation:
    """A batch TRL has generated and not yet scored: its token ids (lists per row) and the
    policy forwards TRL made since (None for each one after the first, which alone can be the
    pi_old pass: TRL makes that one first)."""
    prompt_ids: list
    completion_ids: list
    policy_forwards: list


@dataclass(frozen=True)
class _ScoredBatch:
    """A training batch from its scoring to its head update: the RM's reward-token embeddings,
    the policy's hidden states (None when the mode reads none), the mask the head attends with
    (HeadUpdate.head_mask: the prompt's columns zeroed when it attends to the completion only),
    the column where the completions start, omega."""
    rte: torch.Tensor
    hidden: torch.Tensor | None
    attention_mask: torch.Tensor
    completion_start: int
    omega: float


class R2MTrainerMixin(trl_internals.TRLOverrides):
    """The R2M part of `R2MGRPOTrainer` and `R2MRLOOTrainer` (see `r2m.integrations.trl`).

    reward_model: an R2MRewardModel whose head reads the policy's hidden size. r2m_config: the
    R2M section (mode, head); None takes the reward model's own (`reward_model.config`). A
    reward model whose head disagrees with r2m_config (R2MConfig.check_head) is refused.
    judge: optional, a function in TRL's reward-function form (prompts=, completions=,
    completion_ids=, dataset columns as keywords) -> list of floats, a gold reward that is
    logged (`r2m/gold_reward`), never optimised. reward_funcs: further TRL reward functions,
    after the R2M reward (weights in `args.reward_weights`, R2M's first).
    """

    def __init__(self, model, reward_model: R2MRewardModel, args=None, *, r2m_config: R2MConfig | None = None,
                 judge=None, reward_funcs=None, **kwargs):
        if not isinstance(reward_model, R2MRewardModel):
            raise TypeError(f"reward_model must be an R2MRewardModel; got {type(reward_model).__name__}")
        self.r2m_config = r2m_config if r2m_config is not None else reward_model.config
        self.r2m_config.validate()
        self.r2m_config.check_head(reward_model.head)  # before TRL loads anything
        reward_model.config = self.r2m_config  # what save_model records: this run's mode and training
        self.reward_model, self.judge = reward_model, judge
        self._r2m_reward = R2MReward()
        extra = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]
        super().__init__(model, reward_funcs=[self._r2m_reward, *extra], args=args, **kwargs)

        policy_dim = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        if reward_model.head.k_proj.in_features != policy_dim:
            raise ValueError(f"reward_model's head reads hidden states of size {reward_model.head.k_proj.in_features}; "
                             f"the policy's hidden size is {policy_dim}")
        self._r2m_check_save_steps(self.args.max_steps)
        reward_model.to(self.accelerator.device)
        check_head_backend(reward_model.head.backend, self.accelerator.device)  # before training, not at a reward
        broadcast_parameters(reward_model.head)
        self.head_update = HeadUpdate(reward_model, self.r2m_config)
        self._r2m_generation: _Generation | None = None
        self._r2m_batch: _ScoredBatch | None = None
        self._r2m_capture_rows: torch.Tensor | None = None
        self._r2m_extra_forwards = 0
        self._r2m_batch_metrics: dict[str, float] = {}  # the scored training batch's, logged every optimizer step
        self._r2m_step_metrics: dict[str, list[float]] = {}  # one value per micro-step of the optimizer step
        # first, so that any other callback's on_save finds the checkpoint complete
        self.callback_handler.callbacks.insert(0, SaveR2MState(self))

    # schedule ----------------------------------------------------------------------------------

    def _r2m_check_save_steps(self, max_steps: int) -> None:
        """`checked_save_steps` on this run's settings: in the constructor, and again when training
        begins (SaveR2MState), where a ratio of a length in epochs is known. A Python caller cannot
        be told from one that left save_steps at TRL's default, so a value equal to it is taken for
        it (`r2m train` refuses a save_steps given on its command line or in its file itself)."""
        default = next(f.default for f in dataclasses.fields(self.args) if f.name == "save_steps")
        save_steps, note = checked_save_steps(self.args, max_steps, given=self.args.save_steps != default)
        if note is not None:
            self.args.save_steps = save_steps
            if self.accelerator.is_main_process:
                logger.warning(note)

    def _r2m_omega(self) -> float:
        return omega_schedule(self.state.global_step, max(1, self.state.max_steps), self.reward_model.head.omega_floor)

    # capture -----------------------------------------------------------------------------------

    def _r2m_generated(self, prompt_ids, completion_ids) -> None:
        self._r2m_generation = _Generation(prompt_ids, completion_ids, [])

    def _r2m_policy_forward(self, of_policy: bool, model, input_ids, attention_mask, completion_start: int, forward):
        """Run TRL's forward `forward()`; keep the hidden states of the first policy forward
        after a generation (the pi_old pass, when TRL makes one) or of a training forward whose
        rows `_compute_loss` marked for the head update."""
        generation, rows = self._r2m_generation, self._r2m_capture_rows
        observed = generation is not None and of_policy and self.r2m_config.reads_hidden_states
        if observed and generation.policy_forwards:
            generation.policy_forwards.append(None)
            return forward()
        if not observed and rows is None:
            return forward()
        with HiddenStateCapture(policy_backbone(model)) as capture:
            out = forward()
        if observed:
            generation.policy_forwards.append(_PolicyForward(input_ids, attention_mask, completion_start,
                                                             capture.hidden))
        else:
            hidden = self._r2m_batch.hidden
            hidden[rows] = capture.hidden.to(hidden.dtype)
        return out

    def _r2m_policy_states(self, generation: _Generation) -> _PolicyForward:
        """The hidden states of the policy that generated the batch: TRL's pi_old pass, told
        apart from what TRL did rather than from a copy of its conditions (it is the first
        policy forward, unless that is the PEFT reference pass); where TRL made none, one extra
        no-grad forward, counted in r2m/extra_forwards."""
        forwards = generation.policy_forwards
        if len(forwards) > trl_internals.reference_pass_runs_the_policy(self):
            return forwards[0]
        input_ids, attention_mask, completion_start = trl_internals.generated_batch(self, generation.prompt_ids,
                                                                                    generation.completion_ids)
        with HiddenStateCapture(policy_backbone(self.model)) as capture:
            trl_internals.policy_forward(self, input_ids, attention_mask)
        self._r2m_extra_forwards += 1
        return _PolicyForward(input_ids, attention_mask, completion_start, capture.hidden)

    def _r2m_rows_to_recapture(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The training forward's rows (ids into the scored batch) whose hidden states refresh
        the batch's: those of the last iteration over a batch that reads hidden states."""
        batch = self._r2m_batch
        if not self.model.training or rows is None or batch is None or batch.hidden is None:
            return None
        steps_per_generation = self.args.steps_per_generation
        position = trl_internals.micro_step(self) % trl_internals.micro_steps_per_generation(self.args)
        last_iteration = position >= steps_per_generation * (self.args.num_iterations - 1)
        return rows if last_iteration else None

    # metrics -----------------------------------------------------------------------------------

    def _r2m_log_batch(self, name: str, value: float) -> None:
        """A metric of the batch being scored. In training it goes on the log row of every
        optimizer step that trains on the batch (TRL logs per optimizer step; one batch serves
        several with num_iterations > 1); in evaluation, into TRL's eval metrics."""
        if self.model.training:
            self._r2m_batch_metrics[name] = value
        elif name in COUNT_METRICS:
            trl_internals.log_count(self, name, value)
        else:
            trl_internals.log_metric(self, name, value)

    def _r2m_log_batch_mean(self, name: str, values: torch.Tensor) -> None:
        self._r2m_log_batch(name, self.accelerator.gather(values.float().reshape(-1)).mean().item())

    def _r2m_micro_step_done(self, ends_optimizer_step: bool) -> None:
        """After each training micro-step: its batch's metrics count once toward the optimizer
        step's row (the mean over its micro-steps: the batch's value, or the mean over the batches
        an optimizer step spans), logged when the optimizer step ends."""
        for name, value in self._r2m_batch_metrics.items():
            self._r2m_step_metrics.setdefault(name, []).append(value)
        if not ends_optimizer_step:
            return
        for name, values in self._r2m_step_metrics.items():
            if name in COUNT_METRICS:
                trl_internals.log_count(self, name, values[-1])
            else:
                trl_internals.log_metric(self, name, sum(values) / len(values))
        self._r2m_step_metrics = {}

    # rewards -----------------------------------------------------------------------------------

    def _r2m_score(self, inputs, prompts, completions, completion_ids_list) -> None:
        """Compute the R2M rewards of the generated batch for the R2M reward function, log
        R2M's metrics, and keep a training batch for its head update."""
        generation, self._r2m_generation = self._r2m_generation, None
        device = self.accelerator.device
        if self.r2m_config.reads_hidden_states:
            forward = self._r2m_policy_states(generation)
            input_ids, attention_mask, hidden = forward.input_ids, forward.attention_mask, forward.hidden
            completion_start = forward.completion_start
        else:  # no policy forward is needed; the RM may reuse the policy's tokens
            input_ids, attention_mask, completion_start = trl_internals.generated_batch(
                self, generation.prompt_ids, generation.completion_ids)
            hidden = None
        # the RM reads what TRL would feed it as a reward model, without autocast as TRL runs it
        rm_ids, rm_mask = self.reward_model.rm_inputs(prompts, completions, input_ids=input_ids,
                                                      attention_mask=attention_mask,
                                                      chat_template_kwargs=trl_internals.chat_template_kwargs(self))
        rte = self.reward_model.reward_token_embeddings(rm_ids, rm_mask)
        batch = _ScoredBatch(rte, hidden, self.head_update.head_mask(attention_mask, completion_start),
                             completion_start, self._r2m_omega())
        rewards = self.head_update.rewards(batch.rte, batch.hidden, batch.attention_mask, batch.omega)
        # Counted over every process, so that all of them stop together.
        non_finite = self.accelerator.gather((~torch.isfinite(rewards)).sum().reshape(1)).sum().item()
        if non_finite:
            raise NonFiniteError(f"training step {self.state.global_step + 1}: {non_finite} R2M rewards are not "
                                 "finite; the run stops before they reach the advantages")
        self._r2m_reward.values = rewards.tolist()

        rm_rewards = self.reward_model.static_reward(rte)
        self._r2m_log_batch_mean("r2m/rm_reward", rm_rewards)
        self._r2m_log_batch("r2m/omega", batch.omega)
        self._r2m_log_batch("r2m/extra_forwards", self._r2m_extra_forwards)  # the same on every process
        gold = None
        if self.judge is not None:
            columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
            gold = self.judge(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **columns)
            gold = torch.tensor([float(g) for g in gold], device=device)
            self._r2m_log_batch_mean("r2m/gold_reward", gold)
        if self.model.training:
            lengths = torch.tensor([float(len(ids)) for ids in completion_ids_list], device=device)
            self._r2m_log_agreement(batch, rewards, rm_rewards, gold, lengths)
            if self.r2m_config.reads_hidden_states:
                self._r2m_log_attention(batch)
            self._r2m_batch = batch

    def _r2m_log_agreement(self, batch: _ScoredBatch, rewards, rm_rewards, gold, lengths) -> None:
        """Within-group pairwise agreement of the reward optimised and of the frozen RM with the
        gold reward (when there is a judge) and with the completion length, over the whole
        gathered batch; and, when the reward reads hidden states, the head's share of the
        within-group reward spread, sd(head term) / (sd(head term) + sd(RM term)) averaged
        over groups (docs/design.md §1.2 for the two terms); when the reward has a head, the
        share of groups whose best or worst completion it puts elsewhere than the frozen RM does."""
        gather, k = self.accelerator.gather, self.args.num_generations
        columns = {"r2m/agree_length": (rewards, lengths), "r2m/rm_agree_length": (rm_rewards, lengths)}
        if gold is not None:
            columns.update({"r2m/agree_gold": (rewards, gold), "r2m/rm_agree_gold": (rm_rewards, gold)})
        for name, (scores, truth) in columns.items():
            fraction, pairs = pairwise_agreement(gather(scores.float()), gather(truth.float()), k)
            if pairs:
                self._r2m_log_batch(name, fraction)
        if self.r2m_config.uses_head:
            self._r2m_log_batch("r2m/rerank_share", reranked_share(gather(rewards), gather(rm_rewards), k))
        if self.r2m_config.reads_hidden_states:
            head, rm = (gather(t) for t in self.head_update.reward_terms(batch.rte, batch.hidden,
                                                                         batch.attention_mask, batch.omega))
            spread_head, spread_rm = head.view(-1, k).std(-1), rm.view(-1, k).std(-1)
            total = spread_head + spread_rm
            if bool((total > 0).any()):
                self._r2m_log_batch("r2m/head_share", (spread_head / total)[total > 0].mean().item())

    def _r2m_log_attention(self, batch: _ScoredBatch) -> None:
        """Where the head looks, at this scoring (its weights before this batch's update), on
        the first ATTENTION_DIAGNOSTIC_GROUPS groups whose rows are all on this process:
        r2m/attn_completion_mass (the attention weight on completion positions) and
        r2m/attn_max_weight (the largest weight), each averaged over rows and heads;
        r2m/attn_shared_argmax, the share of groups where every row's most-attended position
        holds a hidden state the whole group shares (r2m.metrics.shared_focus). Each is a
        mean over every process's sample."""
        k, rows = self.args.num_generations, batch.rte.shape[0]
        first = -self.accelerator.process_index * rows % k  # TRL gives each process an equal slice in order
        groups = min(ATTENTION_DIAGNOSTIC_GROUPS, (rows - first) // k)
        sums = [0.0] * 5  # completion mass, max weight, (row, head) pairs, shared groups, groups
        if groups > 0:
            sample = slice(first, first + groups * k)
            mask = batch.attention_mask[sample]
            hidden = self.head_update.head_input(batch.hidden[sample], mask)
            weights = self.reward_model.head.attention_weights(batch.rte[sample], hidden, mask=mask)
            completion = completion_positions(mask, batch.completion_start)
            sums = [completion_attention_mass(weights, completion).sum().item(),
                    max_attention_weight(weights).sum().item(), float(weights[..., 0].numel()),
                    shared_focus(weights, hidden, mask, k).sum().item(), float(groups)]
        sums = torch.tensor(sums, dtype=torch.float64, device=batch.rte.device)
        mass, top, heads, shared, counted = self.accelerator.gather(sums).view(-1, 5).sum(0).tolist()
        if counted:
            self._r2m_log_batch("r2m/attn_completion_mass", mass / heads)
            self._r2m_log_batch("r2m/attn_max_weight", top / heads)
            self._r2m_log_batch("r2m/attn_shared_argmax", shared / counted)

    # head update -------------------------------------------------------------------------------

    def _r2m_generation_batch_done(self) -> None:
        """The last micro-step over the batch has run: one GREBT step on the head with its
        groups of K completions."""
        batch, self._r2m_batch = self._r2m_batch, None
        self._r2m_batch_metrics = {}
        if batch is None or not self.r2m_config.uses_head:
            return
        try:
            result = self.head_update.step(batch.rte, batch.hidden, batch.attention_mask, batch.omega,
                                           self.args.num_generations)
        except NonFiniteError as e:
            raise NonFiniteError(f"training step {self.state.global_step + 1}: {e}") from None
        trl_internals.log_metric(self, "r2m/grebt_loss", result["loss"])
        trl_internals.log_metric(self, "r2m/update_ms", result["ms"])

    # saving ------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """TRL's save of the policy, then the R2M reward model beside it in
        OUTPUT_DIR/r2m_reward_model (R2MRewardModel.save_pretrained), written by the main process
        only. A checkpoint (an internal call with its folder) gets the head from SaveR2MState
        instead; push_to_hub's internal call (no folder) saves it like a user's call."""
        super().save_model(output_dir, _internal_call)
        if (output_dir is None or not _internal_call) and self.args.should_save:
            self.reward_model.save_pretrained(os.path.join(output_dir or self.args.output_dir, REWARD_MODEL_FOLDER))

    # checkpoints (saved by the SaveR2MState callback) --------------------------------------------

    def _r2m_load_checkpoint(self, checkpoint) -> None:
        load_r2m_state(self, checkpoint)


class R2MGRPOTrainer(R2MTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer trained against an R2M reward model: R2MGRPOTrainer(model, reward_model,
    args=GRPOConfig(...), r2m_config=R2MConfig(...), train_dataset=..., judge=None, ...)."""


class R2MRLOOTrainer(R2MTrainerMixin, RLOOTrainer):
    """TRL's RLOOTrainer trained against an R2M reward model; arguments as R2MGRPOTrainer's."""
