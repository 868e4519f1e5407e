"""R2MRewardModel: a frozen reward model (backbone + linear score head) plus a trainable R2MHead,
saved and reloaded in the transformers convention (save_pretrained / from_pretrained)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections import OrderedDict

import torch
import torch.nn as nn

from .config import R2MConfig, message_line
from .head import R2MHead
from .messages import turn_text
from .tokens import attended_positions, generated_layout, last_valid_index, position_ids_from_mask

FORMAT_VERSION = 1  # of r2m_config.json; from_pretrained refuses any other
CONFIG_FILE = "r2m_config.json"
HEAD_FILE = "r2m_head.safetensors"
BACKBONE_FOLDER = "reward_backbone"  # the frozen RM, written only when no name or path records it
SCORE_FILE = "reward_score.safetensors"


def first_line(error: Exception) -> str:
    """An error in one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {message_line(error)}" if str(error).strip() else type(error).__name__


def read_head_weights(folder, device="cpu") -> dict:
    """The head's weights in `folder` (HEAD_FILE); ValueError naming the file when it is missing
    or damaged."""
    from safetensors.torch import load_file

    path = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {HEAD_FILE}: the head's weights are missing")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors reports a truncated or garbled file in its own error types
        raise ValueError(f"{path} is damaged ({first_line(e)})") from None


class R2MRewardModel(nn.Module):
    """A frozen reward model made real-time aligned (docs/design.md §1).

    The RM is a `backbone` (called as backbone(input_ids=, attention_mask=, position_ids=),
    returning last_hidden_state or a tuple whose first item is it, (B, S, D_rm)) and a linear
    `score_head` (D_rm -> 1). Both are frozen: requires_grad is off and no method builds a
    graph through them. `head` is an R2MHead whose score (phi) starts as a copy of score_head;
    it is the only trainable part. Its shape and settings come from `config` (an R2MConfig, the
    one place that decides them; R2MConfig() when None).

    The RM's input is what TRL feeds a sequence-classification reward model when the RM has a
    `tokenizer` (its own; `rm_inputs`), and the reward-token embedding (RTE) is the backbone's
    last hidden state at the token transformers' sequence classifier scores (the rightmost one
    that is not the pad token), so `static_reward` is exactly TRL's reward with that RM. Without
    a tokenizer the RM reads the policy's own token ids as generated, and the RTE is at the last
    valid token.

    RTEs are cached per RM input (the token ids), so each response is embedded once; the cache
    keeps the `cache_size` most recently used (default 4096; each entry is one (D_rm,) vector on
    the RM's device, e.g. 16 KiB at D_rm = 4096 in fp32, so 64 MiB when full) and evicts the
    least recently used. 0 disables it.
    """

    def __init__(self, backbone: nn.Module, score_head: nn.Linear, policy_dim: int, *,
                 config: R2MConfig | None = None, tokenizer=None, cache_size: int = 4096):
        super().__init__()
        self.config = copy.deepcopy(config) if config is not None else R2MConfig()
        self.config.validate()
        self.backbone = backbone.requires_grad_(False).eval()
        self.score_head = score_head.requires_grad_(False)
        self.head = R2MHead.from_score_head(score_head, policy_dim, **self.config.head_kwargs())
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as TRL does for a reward model's tokenizer
        self.tokenizer = tokenizer
        self.name_or_path: str | None = None  # the frozen RM's folder or hub id, when it was loaded from one
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        self._rte_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module, policy_dim: int, *, config: R2MConfig | None = None,
                                 tokenizer=None, **kwargs):
        """From a transformers *ForSequenceClassification RM with one label and a linear `score`
        (Llama, Mistral, Qwen, Gemma, GPT-2 ...): its base model is the backbone, a copy of
        `score` the frozen score head. `tokenizer` is the RM's; when None it is loaded from the
        model's name or path, as TRL loads a reward model's tokenizer."""
        score = getattr(model, "score", None)
        if not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"{type(model).__name__} has no linear `score` head with one output; "
                             "build R2MRewardModel(backbone, score_head, ...) directly")
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or None
        if name_or_path is not None and os.path.isdir(name_or_path):
            name_or_path = os.path.abspath(name_or_path)  # a relative folder would move with the working directory
        if tokenizer is None:
            if name_or_path is None:
                raise ValueError(f"{type(model).__name__} records no name or path to load its tokenizer from: "
                                 "pass tokenizer=")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        rm = cls(model.base_model, copy.deepcopy(score), policy_dim, config=config, tokenizer=tokenizer, **kwargs)
        rm.name_or_path = name_or_path
        return rm

    @property
    def rm_dim(self) -> int:
        return self.score_head.in_features

    @property
    def policy_dim(self) -> int:
        return self.head.policy_dim

    def train(self, mode: bool = True):
        """Only the head changes mode; the frozen RM stays in eval mode (no dropout)."""
        self.head.train(mode)
        return self

    def share_cache(self, cache: OrderedDict) -> None:
        """Use `cache` (an OrderedDict, possibly another R2MRewardModel's) for the RTEs: valid
        between models with the same frozen backbone and tokenizer, which embed a response identically."""
        if not isinstance(cache, OrderedDict):
            raise TypeError(f"cache must be an OrderedDict; got {type(cache).__name__}")
        self._rte_cache = cache

    # RM inputs -------------------------------------------------------------------------------

    def rm_inputs(self, prompts, completions, *, input_ids=None, attention_mask=None, chat_template_kwargs=None):
        """(input_ids, attention_mask) (B, S) that the RM reads, on the RM's device.

        With a tokenizer, what trl 1.16's `_calculate_rewards` feeds a sequence-classification
        RM: conversational prompts (TRL's lists of role/content messages) with their completions
        through the tokenizer's chat template (`chat_template_kwargs` as TRL's config has them),
        text prompts concatenated with their completions; tokenized without special tokens,
        right-padded. Without a tokenizer, the policy's own ids `input_ids`, `attention_mask`."""
        device = self.score_head.weight.device
        if self.tokenizer is None:
            if input_ids is None or attention_mask is None:
                raise ValueError("input_ids and attention_mask are needed when the RM reads the policy's tokens")
            return input_ids.to(device), attention_mask.to(device)
        tok = self.tokenizer
        if isinstance(prompts[0], (list, tuple)):
            if not getattr(tok, "chat_template", None):
                raise ValueError("the prompts are conversations but the RM's tokenizer has no chat template "
                                 "(TRL could not score them with this RM either)")
            texts = [tok.apply_chat_template(list(p) + self._assistant_turn(c), tokenize=False,
                                             **(chat_template_kwargs or {})) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        enc = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @staticmethod
    def _assistant_turn(completion) -> list[dict]:
        return list(completion) if isinstance(completion, (list, tuple)) else [{"role": "assistant",
                                                                                 "content": completion}]

    # RTEs --------------------------------------------------------------------------------------

    def reward_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) the position whose hidden state is the RTE: with a tokenizer, the rightmost valid
        token that is not the pad token (transformers' sequence-classifier rule, with the pad
        token TRL sets: a trailing EOS that is also the pad token is passed over); without one,
        the last valid token."""
        valid = attention_mask.bool()
        if self.tokenizer is not None:
            valid = valid & (input_ids != self.tokenizer.pad_token_id)
        return last_valid_index(valid)

    @torch.no_grad()
    def compute_rte(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, D_rm): the backbone's last hidden state at each row's reward position (no cache)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, self.reward_positions(input_ids, attention_mask).to(hidden.device)]

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

    # scoring new pairs -------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, policy: nn.Module, tokenizer, prompts: list, completions: list, *, omega: float | None = None,
              ended=True, chat_template_kwargs=None) -> torch.Tensor:
        """Rewards (B,) fp32 of (prompt, completion) pairs, as the trainer computes them: the
        completion is laid out after its prompt as TRL lays out a generated one (the prompt
        through `tokenizer`'s chat template when it is a conversation, left-padded; the
        completion's tokens, with the EOS that ends a finished completion, right-padded), one
        forward of `policy` (a causal LM: the policy whose hidden states the head reads, e.g. the
        trained one) gives the hidden states, and the RM reads the pairs as in training.

        prompts: text, or TRL's conversations (lists of role/content messages); completions:
        text, or TRL's [{"role": "assistant", "content": text}]. ended: whether each completion
        ended with EOS (one bool for all, or one per pair; False for one cut at the length limit).
        omega: the weight of the RM's own embedding (docs/design.md §1.2); None is the evaluation
        weight omega_floor. In mode static the reward is the RM's own, in iterative-head phi(rte);
        in every other mode, noise included, the head reads the policy's hidden states, over the
        positions its config's head_attends names (the whole sequence, or the completion only)."""
        from .capture import HiddenStateCapture, policy_backbone

        if len(prompts) != len(completions) or not prompts:
            raise ValueError(f"prompts and completions must be non-empty and of one length; got {len(prompts)} "
                             f"and {len(completions)}")
        ended = [ended] * len(prompts) if isinstance(ended, bool) else list(ended)
        if len(ended) != len(prompts):
            raise ValueError(f"ended must be a bool or one per pair ({len(prompts)}); got {len(ended)}")
        input_ids, attention_mask, completion_start = _generated_layout(tokenizer, prompts, completions, ended,
                                                                        chat_template_kwargs)
        rte = self.reward_token_embeddings(*self.rm_inputs(prompts, completions, input_ids=input_ids,
                                                           attention_mask=attention_mask,
                                                           chat_template_kwargs=chat_template_kwargs))
        if not self.config.uses_head:
            return self.static_reward(rte)
        if self.config.mode == "iterative-head":
            return self.head.score(rte.to(self.head.score.weight.dtype)).squeeze(-1).float()
        device = next(policy.parameters()).device
        backbone = policy_backbone(policy)
        with HiddenStateCapture(backbone) as capture:
            backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        head_device = self.head.score.weight.device
        head_mask = attended_positions(attention_mask, completion_start, self.config.head_attends)
        return self(rte.to(head_device), capture.hidden.to(head_device), mask=head_mask.to(head_device), omega=omega)

    # save and reload ---------------------------------------------------------------------------

    def save_head(self, folder) -> None:
        """Write the head: CONFIG_FILE (the format version, the R2M config with every head
        setting and the mode, rm_dim, policy_dim, the frozen RM's name or path) and HEAD_FILE
        (its weights, safetensors). A trainer's checkpoints hold these two files too."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        settings = {"format_version": FORMAT_VERSION, "rm_dim": self.rm_dim, "policy_dim": self.policy_dim,
                    "r2m": dataclasses.asdict(self.config), "reward_model": self.name_or_path,
                    "tokenizer": self.tokenizer is not None}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  os.path.join(folder, HEAD_FILE))
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(settings, f, indent=1)

    def save_pretrained(self, folder) -> None:
        """Write everything from_pretrained needs into `folder`: the head (save_head), the RM's
        tokenizer, and the frozen RM itself (BACKBONE_FOLDER, a transformers folder, and
        SCORE_FILE) only when no name or path records it."""
        if self.name_or_path is None and not hasattr(self.backbone, "save_pretrained"):
            raise TypeError(f"the backbone is a {type(self.backbone).__name__}, not a transformers model: "
                            "save_pretrained cannot write it")
        self.save_head(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        if self.name_or_path is None:
            from safetensors.torch import save_file

            self.backbone.save_pretrained(os.path.join(folder, BACKBONE_FOLDER))
            save_file({k: v.detach().cpu().contiguous() for k, v in self.score_head.state_dict().items()},
                      os.path.join(folder, SCORE_FILE))

    @classmethod
    def from_pretrained(cls, folder, *, model: nn.Module | None = None, backbone: nn.Module | None = None,
                        score_head: nn.Linear | None = None, tokenizer=None, cache_size: int = 4096):
        """The R2MRewardModel that save_pretrained wrote into `folder`. The frozen RM is `model`
        (a loaded sequence classifier) or `backbone` + `score_head` when given, else loaded from
        the name or path recorded, else from the folder; the tokenizer likewise. ValueError
        naming the file for an unknown format version, and for head weights whose names or
        shapes disagree with the config (one line: the tensor and both shapes)."""
        from safetensors.torch import load_file

        settings = read_head_config(folder)
        config = settings["config"]
        name_or_path = settings["reward_model"]
        if model is not None:
            backbone, score_head = model.base_model, copy.deepcopy(model.score)
        elif backbone is None or score_head is None:
            if backbone is not None or score_head is not None:
                raise ValueError("give both backbone and score_head, or neither")
            if name_or_path is not None:
                from transformers import AutoModelForSequenceClassification

                model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)
                backbone, score_head = model.base_model, copy.deepcopy(model.score)
            else:
                from transformers import AutoModel

                backbone = AutoModel.from_pretrained(os.path.join(folder, BACKBONE_FOLDER))
                score_head = nn.Linear(settings["rm_dim"], 1)
                score_head.load_state_dict(load_file(os.path.join(folder, SCORE_FILE)))
        if score_head.in_features != settings["rm_dim"]:
            raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: rm_dim is {settings['rm_dim']}; the reward "
                             f"model given has hidden size {score_head.in_features}")
        if tokenizer is None and settings["tokenizer"]:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        rm = cls(backbone, score_head, settings["policy_dim"], config=config, tokenizer=tokenizer,
                 cache_size=cache_size)
        rm.name_or_path = name_or_path
        rm.load_head(folder)
        return rm

    def load_head(self, folder) -> None:
        """Load HEAD_FILE from `folder` into the head, on the head's device; ValueError naming the
        file and the tensor when a name or a shape disagrees with the head."""
        path = os.path.join(folder, HEAD_FILE)
        weights = read_head_weights(folder, self.head.score.weight.device)
        expected = self.head.state_dict()
        described = ", ".join(f"{name}={value}" for name, value in self.config.head_kwargs().items()
                              if name in ("attn_dim", "num_heads"))
        for name in sorted(expected.keys() | weights.keys()):
            if name not in weights:
                raise ValueError(f"{path} has no tensor {name}")
            if name not in expected:
                raise ValueError(f"{path} has a tensor {name} that the head ({described}) has not")
            if weights[name].shape != expected[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(weights[name].shape)}; the head's config "
                                 f"({described}, rm_dim={self.rm_dim}, policy_dim={self.policy_dim}) gives "
                                 f"{tuple(expected[name].shape)}")
        self.head.load_state_dict(weights)


def read_head_config(folder) -> dict:
    """CONFIG_FILE in `folder` as {"config": R2MConfig, "rm_dim", "policy_dim", "reward_model",
    "tokenizer"}; ValueError naming the file when it is missing, damaged, of another format
    version, or holds a setting R2MConfig refuses."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a folder R2MRewardModel.save_pretrained wrote")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({first_line(e)})") from None
    keys = ("format_version", "rm_dim", "policy_dim", "r2m", "reward_model", "tokenizer")
    if not isinstance(settings, dict) or not set(keys) <= settings.keys():
        raise ValueError(f"{path} is damaged (it needs {', '.join(keys)})")
    if settings["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {settings['format_version']!r}; this r2m reads "
                         f"{FORMAT_VERSION}")
    try:
        settings["config"] = R2MConfig(**settings.pop("r2m"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {first_line(e)}") from None
    return settings


def _generated_layout(tokenizer, prompts, completions, ended, chat_template_kwargs):
    """(input_ids, attention_mask, completion_start) of prompt + completion pairs laid out as trl
    1.16 lays out a generated batch (r2m.tokens.generated_layout): each prompt tokenized as its
    _tokenize_prompts does, each completion's tokens plus EOS where it ended."""
    if isinstance(prompts[0], (list, tuple)):
        prompt_ids = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, **(chat_template_kwargs or {}))["input_ids"]
                      for p in prompts]
    else:
        prompt_ids = tokenizer(text=list(prompts))["input_ids"]
    completion_ids = [tokenizer(text=turn_text(c, "assistant"), add_special_tokens=False)["input_ids"]
                      + ([tokenizer.eos_token_id] if e else []) for c, e in zip(completions, ended)]
    return generated_layout(prompt_ids, completion_ids, tokenizer.pad_token_id)
