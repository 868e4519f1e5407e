"""Token and mask helpers: where a row's last token is, the positions a padded row would have
unpadded, how a generated batch is laid out, and which of its positions the head attends to."""

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


def generated_layout(prompt_ids: list, completion_ids: list, pad_id: int, pad_to_multiple_of: int | None = None,
                     masked_completions: list | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion_start): generated rows (B, P+C) long as trl 1.16
    lays them out for its forwards: prompts (lists of ids) left-padded in columns
    [0, completion_start), completions right-padded after them, each part as wide as its longest
    row rounded up to a multiple of `pad_to_multiple_of`; the completions of the rows flagged in
    `masked_completions` masked out (TRL's mask_truncated_completions)."""

    def width(rows):
        longest = max(map(len, rows))
        return longest if not pad_to_multiple_of else -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    width_p, width_c = width(prompt_ids), width(completion_ids)
    input_ids = torch.full((len(prompt_ids), width_p + width_c), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    masked = masked_completions or [False] * len(prompt_ids)
    for row, (p, c, hide) in enumerate(zip(prompt_ids, completion_ids, masked)):
        input_ids[row, width_p - len(p):width_p + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[row, width_p - len(p):width_p + (0 if hide else len(c))] = 1
    return input_ids, attention_mask, width_p


def completion_positions(attention_mask: torch.Tensor, completion_start: int) -> torch.Tensor:
    """(B, S) bool: the valid positions of each row's completion in TRL's layout of a generated
    batch, prompt (left-padded) in columns [0, completion_start), completion from there on."""
    valid = attention_mask.bool()
    return valid & (torch.arange(valid.shape[-1], device=valid.device) >= completion_start)


def attended_positions(attention_mask: torch.Tensor, completion_start: int, head_attends: str) -> torch.Tensor:
    """The mask the R2M head attends with, (B, P+C) like `attention_mask` (TRL's layout, the
    completion from column completion_start): the mask itself when the head attends to the whole
    sequence; with head_attends="completion", only each row's completion positions, except in a
    row whose completion has none (TRL masks a truncated completion out with
    mask_truncated_completions), which keeps its whole mask rather than have nothing to attend
    to. The RTEs are not affected: the RM reads the whole sequence."""
    if head_attends == "sequence":
        return attention_mask
    completion = completion_positions(attention_mask, completion_start)
    return torch.where(completion.any(-1, keepdim=True), completion.to(attention_mask.dtype), attention_mask)
