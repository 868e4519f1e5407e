"""The full reward-model update that R2M avoids: a Llama-shaped transformers model with random
weights (LlamaConfig, nothing downloaded), fine-tuned with Bradley-Terry on the (max, min)
pair of every group, forward, backward and AdamW.

The paper (LLaMA3-8B setting) reports 13 s and 65 GB per iteration for a full RM update
against 7 s and 10 GB for R2M's. Weights, gradients and AdamW state are all kept in the
benchmark dtype (8 bytes per parameter in bf16) so that the 8B shape can fit on one 80 GB
GPU; the step runs over micro-batches of pairs with activation checkpointing on the GPU.
Choosing the pairs (scoring all B responses with the RM) is not timed, which favours the
full update.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from .cases import Case
from .sizes import Size

# Llama-3 shapes (hidden, MLP width, layers, heads, KV heads, vocabulary) plus a tiny one.
BACKBONES: dict[str, dict] = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, vocab_size=128256),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def backbone_candidates(choice: str, device: torch.device) -> list[str]:
    """Backbones to try, largest first: `auto` is every Llama shape on the GPU (the first that
    fits wins) and the tiny one on the CPU."""
    if choice != "auto":
        return [choice]
    return ["llama-8b", "llama-3b", "llama-1b"] if device.type == "cuda" else ["tiny"]


def _enable_checkpointing(model) -> None:
    # transformers 5.x renamed gradient checkpointing to activation checkpointing; support both.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rm_full_case(size: Size, backbone: str, dtype: torch.dtype, device: torch.device,
                 micro_pairs: int | None = None) -> Case:
    """One full RM update on size.prompts pairs of size.seq_len-token sequences.

    micro_pairs: pairs per forward/backward (gradients accumulate over micro-batches);
    default 4 on the GPU (with activation checkpointing), all pairs at once on the CPU."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    pairs, seq_len = size.prompts, size.seq_len
    on_gpu = device.type == "cuda"
    micro_pairs = min(pairs, micro_pairs or (4 if on_gpu else pairs))
    shape = BACKBONES[backbone]
    config = LlamaConfig(**shape, num_labels=1, pad_token_id=0, use_cache=False,
                         max_position_embeddings=max(2048, seq_len))
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.train()
    if on_gpu:
        _enable_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=on_gpu)
    # Token 0 is the padding id; sequences are full length, so the score is at the last token.
    chosen = torch.randint(1, shape["vocab_size"], (pairs, seq_len), device=device)
    rejected = torch.randint(1, shape["vocab_size"], (pairs, seq_len), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, pairs, micro_pairs):
            stop = min(start + micro_pairs, pairs)
            ids = torch.cat([chosen[start:stop], rejected[start:stop]])
            scores = model(input_ids=ids).logits.squeeze(-1).float()
            margin = scores[: stop - start] - scores[stop - start:]
            (-F.logsigmoid(margin).sum() / pairs).backward()  # mean Bradley-Terry loss over all pairs
        optimizer.step()

    params = sum(p.numel() for p in model.parameters())
    count = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    note = (f"{backbone} shape, {count} params (random weights), {pairs} pairs x 2 x "
            f"{seq_len} tokens, micro-batch {micro_pairs} pairs"
            f"{', activation checkpointing' if on_gpu else ''}; weights, grads and AdamW state in "
            f"{str(dtype).replace('torch.', '')}")
    return Case(step, list(model.parameters()), note=note)


def fitting_rm_full_case(size: Size, choice: str, dtype: torch.dtype, device: torch.device,
                         micro_pairs: int | None = None) -> Case:
    """The first of backbone_candidates(choice) whose update step runs without running out of
    memory, after that one step (so its optimizer state exists); its note names the backbones
    that did not fit. Raises torch.cuda.OutOfMemoryError when none fits."""
    did_not_fit = []
    for backbone in backbone_candidates(choice, device):
        case = None
        try:
            case = rm_full_case(size, backbone, dtype, device, micro_pairs)
            case.step()
            if did_not_fit:
                case.note += f"; did not fit: {', '.join(did_not_fit)}"
            return case
        except torch.cuda.OutOfMemoryError:
            did_not_fit.append(backbone)
        # Outside the except block, so that the exception's frames no longer hold the model.
        case = None
        gc.collect()
        torch.cuda.empty_cache()
    raise torch.cuda.OutOfMemoryError(f"no reward-model backbone fits: {', '.join(did_not_fit)}")
