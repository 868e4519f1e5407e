"""Two processes on the CPU (torchrun, gloo) running R2MGRPOTrainer: a group of K completions
straddles the ranks; the all-reduced head gradient equals the single-process gradient of the
whole batch's GREBT loss, and both ranks end with bitwise equal heads; the attention diagnostics
are computed on the groups whole on each rank and averaged over both. `r2m train` on two
processes exits 0 with its process group destroyed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from r2m import GREBTLoss, R2MHead  # noqa: E402
from r2m.metrics import completion_attention_mass, max_attention_weight, shared_focus  # noqa: E402
from r2m.tokens import completion_positions  # noqa: E402

from tests.support.trl_tiny import POLICY_DIM, RM_DIM, save_tiny_models  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "trl_two_ranks.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S, ...) right-padded with zeros to (B, width, ...) (the mask marks what is valid)."""
    pad = torch.zeros((t.shape[0], width - t.shape[1]) + t.shape[2:], dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def torchrun(*args) -> subprocess.CompletedProcess:
    """SCRIPT on two CPU processes; asserts that both exit 0."""
    # the repository root: with tests/ on the path, tests/kernels shadows the `kernels` package transformers imports
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    models = save_tiny_models(tmp_path / "models")
    torchrun("trainer", models, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # 6 rows per rank, groups of 4: rows 4-7 are one prompt's group, split 2 + 2 across the ranks
    for step_prompts in zip(ranks[0]["prompts"], ranks[1]["prompts"]):
        whole = step_prompts[0] + step_prompts[1]
        assert len(whole) == 12 and all(len(set(whole[g * 4:g * 4 + 4])) == 1 for g in range(3))
    assert len(ranks[0]["updates"]) == len(ranks[1]["updates"]) == 2

    for update0, update1 in zip(ranks[0]["updates"], ranks[1]["updates"]):
        for name in update0["head_before"]:
            assert torch.equal(update0["head_before"][name], update1["head_before"][name]), name
        width = max(update0["hidden"].shape[1], update1["hidden"].shape[1])
        rte = torch.cat([update0["rte"], update1["rte"]])
        hidden = torch.cat([pad_to(update0["hidden"], width), pad_to(update1["hidden"], width)])
        mask = torch.cat([pad_to(update0["mask"], width), pad_to(update1["mask"], width)])
        head = R2MHead(RM_DIM, POLICY_DIM, attn_dim=16, num_heads=2)
        head.load_state_dict(update0["head_before"])
        loss = GREBTLoss(alpha=0.3)(head(rte, hidden, mask=mask, omega=update0["omega"]), group_size=4)
        loss.backward()
        assert update0["omega"] < 1 or update0 is ranks[0]["updates"][0]
        for name, p in head.named_parameters():
            assert torch.equal(update0["grads"][name], update1["grads"][name]), name
            # the all-reduce sums in another order: float32 rounding relative to the gradient's size
            torch.testing.assert_close(update0["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert any(g.abs().max() > 1e-4 for g in update0["grads"].values())
    # at omega < 1 every weight has a gradient, so the comparison above covers the attention block
    # (not score.bias: GREBT is unchanged by a shift of every reward, so its gradient is 0 up to rounding)
    last = ranks[0]["updates"][-1]
    assert last["omega"] < 1 and all(g.abs().max() > 0 for name, g in last["grads"].items() if name != "score.bias")
    for name, value in ranks[0]["head"].items():
        assert torch.equal(value, ranks[1]["head"][name]), name

    # the first step's attention diagnostics: rank 0's whole group is its rows 0-3, rank 1's its
    # rows 2-5 (the third group); the scoring's hidden states equal the update's (one iteration,
    # no optimizer step between them) up to rounding
    weights, masses, tops, shared = [], [], [], []
    for rank, rows in zip(ranks, (slice(0, 4), slice(2, 6))):
        update, start = rank["updates"][0], rank["completion_starts"][0]
        head = R2MHead(RM_DIM, POLICY_DIM, attn_dim=16, num_heads=2)
        head.load_state_dict(update["head_before"])
        hidden, mask = update["hidden"][rows], update["mask"][rows]
        w = head.attention_weights(update["rte"][rows], hidden, mask=mask)
        masses.append(completion_attention_mass(w, completion_positions(mask, start)))
        tops.append(max_attention_weight(w))
        shared.append(shared_focus(w, hidden, mask, 4))
    logged, logged1 = ([row for row in rank["log"] if "r2m/attn_max_weight" in row][0] for rank in ranks)
    assert all(logged[k] == logged1[k] for k in logged if k.startswith("r2m/attn_"))
    assert logged["r2m/attn_completion_mass"] == pytest.approx(torch.cat(masses).mean().item(), abs=1e-5)
    assert logged["r2m/attn_max_weight"] == pytest.approx(torch.cat(tops).mean().item(), abs=1e-5)
    assert logged["r2m/attn_shared_argmax"] == torch.cat(shared).double().mean().item()


@pytest.mark.slow
def test_r2m_train_on_two_processes_destroys_its_process_group(tmp_path):
    """`r2m train` tears its process group down before returning: left to the interpreter's
    exit, gloo's threads aborted a rank after a finished run now and then (exit status 1,
    "terminate called without an active exception"), too rarely for one run to show it."""
    models = save_tiny_models(tmp_path / "models")
    out = tmp_path / "run"
    torchrun("cli", tmp_path, "--policy", models / "policy", "--reward_model", models / "rm", "--prompts",
             models / "prompts.txt", "--output_dir", out, "--device", "cpu", "--trainer", "grpo", "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
             "--attn_dim", "8", "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true")
    records = [json.loads((tmp_path / f"cli_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records == [{"status": 0, "process_group_left": False}] * 2
    assert (out / "checkpoint-2" / "r2m_head.safetensors").is_file()
