"""Token and mask helpers of the reward model: where a row's last token is, the positions a
padded row would have unpadded, whether two tokenizers make the same ids, and where a
generated row's completion is."""

from __future__ import annotations

import torch


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last nonzero position of each row of a (B, S) mask; works for left,
    right or no padding. A row without a valid position is an error."""
    valid = attention_mask.bool()
    if not bool(valid.any(-1).all()):
        raise ValueError("attention_mask has a row with no valid token")
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).amax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over valid tokens only, so a left-padded row gets the positions it would
    have unpadded (what transformers' generate does; a plain forward would count the pads)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers turn text into the same ids with the same chat template."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
            and a.all_special_tokens == b.all_special_tokens)


def completion_positions(attention_mask: torch.Tensor, completion_start: int) -> torch.Tensor:
    """(B, S) bool: the valid positions of each row's completion in TRL's layout of a generated
    batch, prompt (left-padded) in columns [0, completion_start), completion from there on."""
    valid = attention_mask.bool()
    return valid & (torch.arange(valid.shape[-1], device=valid.device) >= completion_start)
