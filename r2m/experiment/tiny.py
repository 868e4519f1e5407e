"""A tiny random-weight Llama policy and reward model with a character tokenizer, built in
code (nothing downloaded): for tests and for `r2m experiment --tiny`, a smoke run in seconds."""

from __future__ import annotations

import string

import torch.nn as nn

from ..messages import turn_text

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<a>{% endif %}")


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level PreTrainedTokenizerFast: <pad>=0, <s>=1, </s>=2 (eos), <unk>=3, role
    markers, then printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<u>", "<a>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in string.printable[:95]:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("<[a-z/]+>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<u>", "<a>"])
    tok.chat_template = chat_template
    return tok


def tiny_llama_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=True,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def tiny_policy(tokenizer, hidden_size: int = 32, layers: int = 2):
    """A random-weight LlamaForCausalLM for `tokenizer`, fp32."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size, layers)).eval()


def tiny_reward_backbone(tokenizer, hidden_size: int = 24, layers: int = 2):
    """A random-weight LlamaModel (the RM's backbone) and a score head Linear(hidden_size, 1)."""
    from transformers import LlamaModel

    return LlamaModel(tiny_llama_config(len(tokenizer), hidden_size, layers)).eval(), nn.Linear(hidden_size, 1)


TINY_PROMPTS = [f"{a}+{b}=" for a in range(3) for b in range(4)]


def tiny_judge(prompt: str, response: str) -> float:
    """1 when the response starts with the sum asked for (random weights rarely manage it)."""
    a, b = prompt.rstrip("=").split("+")
    return float(response.strip().startswith(str(int(a) + int(b))))


def tiny_judge_func(prompts, completions, **kwargs) -> list[float]:
    """tiny_judge in TRL's reward-function form (text or conversational prompts)."""
    return [tiny_judge(turn_text(p, "user"), turn_text(c, "assistant")) for p, c in zip(prompts, completions)]
