"""One rank of the two-process tests (tests/training/test_trl_two_processes.py), launched by torchrun
on the CPU (gloo).

`trainer`: 2 GRPO steps of R2MGRPOTrainer, 6 completions per rank, groups of K = 4, so the
second group straddles the ranks. Each rank saves, per head update, its inputs, the head before
the step and the all-reduced gradients, the column where each batch's completions start, its
final head and TRL's log history, to OUT/rank{r}.pt.
`cli`: `r2m train` with ARGS; each rank writes its exit status and whether a process group is
still initialised when the command has returned to OUT/cli_rank{r}.json.

usage: torchrun --nproc_per_node 2 tests/support/trl_two_ranks.py trainer MODELS OUT
       torchrun --nproc_per_node 2 tests/support/trl_two_ranks.py cli OUT ARGS...
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.trl_tiny import make_trainer, snapshot  # noqa: E402


def main(models: Path, out: Path) -> None:
    trainer, rm = make_trainer(models, "grpo", out / "run", max_steps=2, per_device_train_batch_size=6)
    rank = trainer.accelerator.process_index
    updates, prompts = [], []
    head_update = trainer.head_update
    step = head_update.step

    def record_step(rte, hidden, mask, omega, group_size):
        updates.append(dict(rte=rte.clone(), hidden=hidden.clone(), mask=mask.clone(), omega=omega,
                            group_size=group_size, head_before=snapshot(rm.head)))
        return step(rte, hidden, mask, omega, group_size)

    def keep_gradients(optimizer, args, kwargs):
        updates[-1]["grads"] = {name: p.grad.clone() for name, p in rm.head.named_parameters()}

    head_update.step = record_step
    head_update.optimizer.register_step_pre_hook(keep_gradients)
    calculate_rewards = trainer._calculate_rewards

    def record_prompts(inputs, prompt_list, completions, completion_ids):
        prompts.append([p[-1]["content"] for p in prompt_list])
        return calculate_rewards(inputs, prompt_list, completions, completion_ids)

    trainer._calculate_rewards = record_prompts
    starts, head_mask = [], head_update.head_mask
    head_update.head_mask = lambda mask, start: (starts.append(start), head_mask(mask, start))[1]
    trainer.train()
    torch.save({"world_size": trainer.accelerator.num_processes, "updates": updates, "prompts": prompts,
                "completion_starts": starts, "head": snapshot(rm.head), "log": trainer.state.log_history},
               out / f"rank{rank}.pt")
    trainer.accelerator.end_training()  # as `r2m train` does: no process group left to the interpreter's exit


def cli(out: Path, argv: list[str]) -> None:
    from r2m.cli import main as r2m_main

    status = r2m_main(["train", *argv])
    record = {"status": status, "process_group_left": torch.distributed.is_initialized()}
    (out / f"cli_rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    if sys.argv[1] == "trainer":
        main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        cli(Path(sys.argv[2]), sys.argv[3:])
