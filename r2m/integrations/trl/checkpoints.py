"""The R2M state in TRL's checkpoints: the head's weights and a state file (mode, schedule
length, extra-forward count, the head optimizer's state) beside TRL's own files in checkpoint-N,
so that a resumed run continues exactly."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

HEAD_FILE = "r2m_head.safetensors"
STATE_FILE = "r2m_state.pt"


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


class SaveR2MState(TrainerCallback):
    """Writes the R2M state into each checkpoint-N the trainer has just saved (on_save follows
    the trainer's save, before the next step, so the head and its optimizer are as of step N)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        from safetensors.torch import save_file

        trainer = self.trainer
        # TRL's trainers take no model_init, so there is no hyperparameter-search trial folder:
        # checkpoints go straight into output_dir
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_file({k: v.detach().cpu().contiguous() for k, v in trainer.reward_model.head.state_dict().items()},
                  os.path.join(folder, HEAD_FILE))
        torch.save({"mode": trainer.r2m_config.mode, "max_steps": state.max_steps,
                    "extra_forwards": trainer._r2m_extra_forwards,
                    "optimizer": trainer.head_update.optimizer.state_dict()}, os.path.join(folder, STATE_FILE))


def load_r2m_state(trainer, checkpoint) -> None:
    """Restore the head, its optimizer and the extra-forward count from `checkpoint`, after
    checking that it suits this run."""
    from safetensors.torch import load_file

    state = read_checkpoint_state(checkpoint)
    check_resumable(state, checkpoint, trainer.r2m_config.mode, trainer.state.max_steps)
    device = trainer.accelerator.device
    trainer.reward_model.head.load_state_dict(load_file(os.path.join(checkpoint, HEAD_FILE), device=str(device)))
    trainer.head_update.optimizer.load_state_dict(state["optimizer"])
    trainer._r2m_extra_forwards = state["extra_forwards"]
