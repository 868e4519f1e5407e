"""Token and mask helpers: where a row's last token is, the positions a padded row would have
unpadded, and how a generated batch is laid out."""

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
                     masked_completions: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, P+C) long of generated rows as trl 1.16 lays them out for
    its forwards: prompts (lists of ids) left-padded, completions right-padded, each part as wide
    as its longest row rounded up to a multiple of `pad_to_multiple_of`; the completions of the
    rows flagged in `masked_completions` masked out (TRL's mask_truncated_completions)."""

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
    return input_ids, attention_mask
