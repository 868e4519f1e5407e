"""The benchmark sizes (docs/design.md §6), in one place.

B sequences of S positions of the policy's hidden states (width D_p); the reward model's
width D_rm; the attention width d split over n_h heads. `group` is K, the responses per
prompt, used by the ops that train on groups (grebt, update, rm-update): B / K prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Size:
    name: str
    batch: int  # B
    seq_len: int  # S
    policy_dim: int  # D_p
    rm_dim: int  # D_rm
    attn_dim: int  # d
    num_heads: int  # n_h
    group: int = 8  # K

    def __post_init__(self):
        if self.batch % self.group:
            raise ValueError(f"size {self.name}: batch {self.batch} is not a multiple of group {self.group}")

    @property
    def prompts(self) -> int:
        return self.batch // self.group

    def as_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, Size] = {s.name: s for s in (
    Size("paper-8b", 512, 1024, 4096, 4096, 2048, 1),
    Size("paper-3b", 512, 1024, 2048, 4096, 2048, 1),
    Size("long", 64, 8192, 4096, 4096, 2048, 1),
    Size("heads", 512, 1024, 4096, 4096, 2048, 16),
    # Two groups of four so that the group ops average over more than one group.
    Size("tiny-cpu", 8, 64, 576, 576, 64, 1, group=4),
    # For `--ops grebt`: 16384 groups of 8, a large batch of small groups (paper-8b is 64 x 8).
    Size("groups-16k", 16384 * 8, 1, 64, 64, 64, 1),
)}

GPU_DEFAULT = ("paper-8b", "paper-3b", "long", "heads")
CPU_DEFAULT = ("tiny-cpu",)
