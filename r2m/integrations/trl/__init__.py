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
- saves the head and its optimizer in TRL's checkpoints and restores them on resume, and the
  reward model beside the policy in `save_model` (OUTPUT_DIR/r2m_reward_model).

Modules: `trainers` (the mixin and the two trainers), `checkpoints` (the R2M state in a
checkpoint folder), `trl_internals` (every use of TRL's private methods and attributes, with
the TRL version each was read from).
"""

from ...reward_model import HEAD_FILE, read_head_weights
from .checkpoints import STATE_FILE, check_resumable, read_checkpoint_state
from .trainers import R2MGRPOTrainer, R2MReward, R2MRLOOTrainer, R2MTrainerMixin
from .trl_internals import TESTED_TRL

__all__ = ["R2MGRPOTrainer", "R2MRLOOTrainer", "R2MTrainerMixin", "R2MReward", "read_checkpoint_state", "read_head_weights",
           "check_resumable", "HEAD_FILE", "STATE_FILE", "TESTED_TRL"]
