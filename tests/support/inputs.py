"""Random test inputs: masks of every pattern the ops must handle, and packing."""

import torch

MASK_KINDS = ("none", "right", "left", "holes")


def make_mask(batch, seq_len, kind, generator=None):
    """(B, S) bool mask: "none" -> None; "right"/"left" padding with random lengths >= 1;
    "holes": random gaps anywhere, at least one valid position per row; "mixed": rows of
    right padding, left padding and holes in turn."""
    if kind == "none":
        return None
    if kind == "mixed":
        rows = [make_mask(1, seq_len, ("right", "left", "holes")[b % 3], generator) for b in range(batch)]
        return torch.cat(rows)
    if kind == "holes":
        mask = torch.rand(batch, seq_len, generator=generator) > 0.4
        mask[torch.arange(batch), torch.randint(seq_len, (batch,), generator=generator)] = True
        return mask
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    pos = torch.arange(seq_len)
    if kind == "right":
        return pos[None, :] < lengths[:, None]
    return pos[None, :] >= (seq_len - lengths)[:, None]


def pack(hidden, mask):
    """Padded (B, S, D) + mask -> packed (N, D) of the valid rows, cu_seqlens (B+1,) int32."""
    lengths = mask.sum(1)
    cu = torch.zeros(hidden.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return hidden[mask.bool()], cu
