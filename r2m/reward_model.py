"""R2MRewardModel: a frozen reward model (backbone + linear score head) plus a trainable R2MHead."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn

from .head import R2MHead
from .messages import message_text
from .tokens import last_valid_index, position_ids_from_mask, same_tokenizer


class R2MRewardModel(nn.Module):
    """A frozen reward model made real-time aligned (docs/design.md §1).

    The RM is a `backbone` (called as backbone(input_ids=, attention_mask=, position_ids=),
    returning last_hidden_state or a tuple whose first item is it, (B, S, D_rm)) and a linear
    `score_head` (D_rm -> 1). Both are frozen: requires_grad is off and no method builds a
    graph through them. `head` is an R2MHead whose score (phi) starts as a copy of score_head;
    it is the only trainable part.

    The reward-token embedding (RTE) is the backbone's last hidden state at the last valid
    token. RTEs are cached per RM input (the token ids), so each response is embedded once;
    the cache keeps the `cache_size` most recently used (default 4096; each entry is one (D_rm,)
    vector on the RM's device, e.g. 16 KiB at D_rm = 4096 in fp32, so 64 MiB when full) and
    evicts the least recently used. 0 disables it.
    When the RM's tokenizer differs from the policy's, responses are re-tokenized from text with
    the RM's tokenizer and chat template: a text prompt becomes the user turn and the response
    the assistant's; a conversational prompt (a list of messages, TRL's format) keeps its turns.
    """

    def __init__(self, backbone: nn.Module, score_head: nn.Linear, policy_dim: int, *, tokenizer=None,
                 attn_dim: int = 2048, num_heads: int = 1, omega_floor: float = 0.6,
                 total_steps: int | None = None, backend: str = "auto", cache_size: int = 4096):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.score_head = score_head.requires_grad_(False)
        self.head = R2MHead.from_score_head(score_head, policy_dim, attn_dim=attn_dim, num_heads=num_heads,
                                            omega_floor=omega_floor, total_steps=total_steps, backend=backend)
        self.tokenizer = tokenizer
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        self._rte_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module, policy_dim: int, *, tokenizer=None, **kwargs):
        """From a transformers *ForSequenceClassification RM with one label and a linear `score`
        (Llama, Mistral, Qwen, Gemma, GPT-2 ...): its base model is the backbone, a copy of
        `score` the frozen score head."""
        score = getattr(model, "score", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no linear `score` head with one output; "
                             "build R2MRewardModel(backbone, score_head, ...) directly")
        return cls(model.base_model, copy.deepcopy(score), policy_dim, tokenizer=tokenizer, **kwargs)

    @property
    def rm_dim(self) -> int:
        return self.score_head.in_features

    def train(self, mode: bool = True):
        """Only the head changes mode; the frozen RM stays in eval mode (no dropout)."""
        self.head.train(mode)
        return self

    def share_cache(self, cache: OrderedDict) -> None:
        """Use `cache` (an OrderedDict, possibly another R2MRewardModel's) for the RTEs: valid
        between models with the same frozen backbone, which embed a response identically."""
        if not isinstance(cache, OrderedDict):
            raise TypeError(f"cache must be an OrderedDict; got {type(cache).__name__}")
        self._rte_cache = cache

    # RM inputs -------------------------------------------------------------------------------

    def rm_inputs(self, prompts, responses, *, input_ids=None, attention_mask=None, policy_tokenizer=None):
        """(input_ids, attention_mask) for the RM. The policy's own ids are reused when the RM
        shares its tokenizer (or has none); otherwise the text is re-tokenized. Prompts and
        responses are strings, or TRL's conversational form (lists of role/content messages)."""
        if self.tokenizer is None or same_tokenizer(self.tokenizer, policy_tokenizer):
            if input_ids is None or attention_mask is None:
                raise ValueError("input_ids and attention_mask are needed when the RM reuses the policy's tokens")
            return input_ids, attention_mask
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(self._conversation(p, r), tokenize=False) for p, r in zip(prompts, responses)]
            special = False  # the template already has them
        else:
            texts = ["".join(message_text(m) for m in self._conversation(p, r)) for p, r in zip(prompts, responses)]
            special = True
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        device = self.score_head.weight.device
        enc = tok(texts, padding=True, add_special_tokens=special, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @staticmethod
    def _conversation(prompt, response) -> list[dict]:
        messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
        if isinstance(response, (list, tuple)):
            return messages + list(response)
        return messages + [{"role": "assistant", "content": response}]

    # RTEs --------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_rte(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, D_rm): the backbone's last hidden state at each row's last valid token (no cache)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_valid_index(attention_mask).to(hidden.device)]

    @torch.no_grad()
    def reward_token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """compute_rte with the cache: only rows not seen before go through the backbone."""
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        first_row_of_new_key: dict[tuple, int] = {}
        for i, key in enumerate(keys):
            if key not in self._rte_cache and key not in first_row_of_new_key:
                first_row_of_new_key[key] = i
        if first_row_of_new_key:
            rows = torch.tensor(list(first_row_of_new_key.values()), device=input_ids.device)
            fresh = self.compute_rte(input_ids[rows], attention_mask[rows])
            # a clone per row: a view would keep the whole batch's tensor alive until every row is evicted
            self._rte_cache.update((key, row.clone()) for key, row in zip(first_row_of_new_key, fresh))
        rte = torch.stack([self._rte_cache[key] for key in keys])
        for key in keys:
            self._rte_cache.move_to_end(key)
        while len(self._rte_cache) > self.cache_size:
            self._rte_cache.popitem(last=False)
        return rte

    # rewards -----------------------------------------------------------------------------------

    @torch.no_grad()
    def static_reward(self, rte: torch.Tensor) -> torch.Tensor:
        """The original RM's reward, (B,) fp32: score_head(rte)."""
        return self.score_head(rte.to(self.score_head.weight.dtype)).squeeze(-1).float()

    def forward(self, rte, hidden, *, mask=None, cu_seqlens=None, step=None, omega=None) -> torch.Tensor:
        """The R2M reward (B,) fp32: head(rte, hidden) (see R2MHead.forward). `hidden` is the
        policy's last-layer hidden states, detached."""
        return self.head(rte, hidden, mask=mask, cu_seqlens=cu_seqlens, step=step, omega=omega)
