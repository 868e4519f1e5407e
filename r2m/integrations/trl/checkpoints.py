"""The R2M state in TRL's checkpoints: the head (R2MRewardModel.save_head: its config, what it
attends to included, and its weights, the files save_pretrained writes too) and a state file
(mode, schedule length, extra-forward count, the head optimizer's state) beside TRL's own files
in checkpoint-N, so that a resumed run continues exactly."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...config import HEAD_FIELDS
from ...reward_model import first_line, read_head_config

STATE_FILE = "r2m_state.pt"
STATE_KEYS = ("mode", "max_steps", "extra_forwards", "optimizer")


def read_checkpoint_state(folder) -> dict:
    """The R2M state saved in a TRL checkpoint folder; ValueError naming the file when it is
    missing or damaged."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {STATE_FILE}: not a checkpoint of an R2M trainer")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or overwritten: the zip reader or the unpickler fails, in many types
        raise ValueError(f"{path} is damaged ({first_line(e)})") from None
    if not isinstance(state, dict) or not set(STATE_KEYS) <= state.keys():
        raise ValueError(f"{path} is damaged (it holds no R2M state)")
    return state


def check_resumable(state: dict, folder, mode: str, max_steps: int, config=None) -> None:
    """ValueError when the checkpoint was written in another mode, for another schedule length
    (omega depends on max_steps, so a different one would change every reward after the resume)
    or, given this run's R2MConfig `config`, for a head with other settings or attending to
    something else (the backend aside: a run may resume on another device)."""
    if config is not None:
        saved = read_head_config(folder)["config"]
        for name in (*HEAD_FIELDS, "head_attends"):
            if name != "head_backend" and getattr(saved, name) != getattr(config, name):
                raise ValueError(f"{folder} holds a head with {name}={getattr(saved, name)!r}; this run has "
                                 f"{name}={getattr(config, name)!r}")
    if state["mode"] != mode:
        raise ValueError(f"{folder} was written in mode {state['mode']!r}; this run is {mode!r}")
    if state["max_steps"] != max_steps:
        raise ValueError(f"{folder} was written for max_steps={state['max_steps']} (omega's schedule length); "
                         f"this run has max_steps={max_steps}")


class SaveR2MState(TrainerCallback):
    """Writes the R2M state into each checkpoint-N the trainer has just saved (on_save follows
    the trainer's save, before the next step, so the head and its optimizer are as of step N);
    checks, as training begins, that the checkpoints fall between generation batches."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # again: a save_steps ratio of a length in epochs is resolved from here on
        self.trainer._r2m_check_save_steps(state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        trainer = self.trainer
        # TRL's trainers take no model_init, so there is no hyperparameter-search trial folder:
        # checkpoints go straight into output_dir
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        trainer.reward_model.save_head(folder)
        torch.save({"mode": trainer.r2m_config.mode, "max_steps": state.max_steps,
                    "extra_forwards": trainer._r2m_extra_forwards,
                    "optimizer": trainer.head_update.optimizer.state_dict()}, os.path.join(folder, STATE_FILE))


def load_r2m_state(trainer, checkpoint) -> None:
    """Restore the head, its optimizer and the extra-forward count from `checkpoint`, after
    checking that it suits this run."""
    state = read_checkpoint_state(checkpoint)
    check_resumable(state, checkpoint, trainer.r2m_config.mode, trainer.state.max_steps, trainer.r2m_config)
    trainer.reward_model.load_head(checkpoint)
    trainer.head_update.optimizer.load_state_dict(state["optimizer"])
    trainer._r2m_extra_forwards = state["extra_forwards"]
