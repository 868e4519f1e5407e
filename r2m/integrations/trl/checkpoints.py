"""The R2M state in TRL's checkpoints: the head's weights and a state file (mode, what the head
attends to, schedule length, extra-forward count, the head optimizer's state) beside TRL's own
files in checkpoint-N,
so that a resumed run continues exactly."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

HEAD_FILE = "r2m_head.safetensors"
STATE_FILE = "r2m_state.pt"


STATE_KEYS = ("mode", "max_steps", "extra_forwards", "optimizer")  # and head_attends, absent before it existed


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def read_checkpoint_state(folder) -> dict:
    """The R2M state saved in a TRL checkpoint folder; ValueError naming the file when it is
    missing or damaged."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {STATE_FILE}: not a checkpoint of an R2M trainer")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or overwritten: the zip reader or the unpickler fails, in many types
        raise ValueError(f"{path} is damaged ({_first_line(e)})") from None
    if not isinstance(state, dict) or not set(STATE_KEYS) <= state.keys():
        raise ValueError(f"{path} is damaged (it holds no R2M state)")
    return state


def read_head_weights(folder, device="cpu") -> dict:
    """The head's weights saved in a TRL checkpoint folder; ValueError naming the file when it
    is missing or damaged."""
    from safetensors.torch import load_file

    path = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {HEAD_FILE}: the head's weights are missing")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors reports a truncated or garbled file in its own error types
        raise ValueError(f"{path} is damaged ({_first_line(e)})") from None


def check_resumable(state: dict, folder, mode: str, max_steps: int, head_attends: str) -> None:
    """ValueError when the checkpoint was written in another mode, with the head attending to
    something else, or for another schedule length (omega depends on max_steps, so a different
    one would change every reward after the resume)."""
    if state["mode"] != mode:
        raise ValueError(f"{folder} was written in mode {state['mode']!r}; this run is {mode!r}")
    written = state.get("head_attends", "sequence")  # checkpoints older than the setting attended to it all
    if written != head_attends:
        raise ValueError(f"{folder} was written with head_attends={written!r}; this run has "
                         f"head_attends={head_attends!r}")
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
        torch.save({"mode": trainer.r2m_config.mode, "head_attends": trainer.r2m_config.head_attends,
                    "max_steps": state.max_steps,
                    "extra_forwards": trainer._r2m_extra_forwards,
                    "optimizer": trainer.head_update.optimizer.state_dict()}, os.path.join(folder, STATE_FILE))


def load_r2m_state(trainer, checkpoint) -> None:
    """Restore the head, its optimizer and the extra-forward count from `checkpoint`, after
    checking that it suits this run."""
    state = read_checkpoint_state(checkpoint)
    check_resumable(state, checkpoint, trainer.r2m_config.mode, trainer.state.max_steps,
                    trainer.r2m_config.head_attends)
    trainer.reward_model.head.load_state_dict(read_head_weights(checkpoint, trainer.accelerator.device))
    trainer.head_update.optimizer.load_state_dict(state["optimizer"])
    trainer._r2m_extra_forwards = state["extra_forwards"]
