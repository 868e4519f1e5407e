"""Capturing the policy's last-layer hidden states from a forward the RL engine already makes.

RL engines score tokens with a fused LM head that never returns `hidden_states`, so the states
are taken where they are produced: a forward hook on the policy's backbone (the decoder stack
whose output feeds the LM head) keeps its `last_hidden_state`, detached.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def policy_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM, under any wrapper: DDP/DeepSpeed (`.module`), PEFT
    (`get_base_model()`), then transformers' `base_model` (LlamaForCausalLM -> LlamaModel)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(f"{type(model).__name__} has no backbone (`base_model`) to take hidden states from")
    return backbone


class HiddenStateCapture:
    """Context manager: while open, every forward of `backbone` appends its last hidden state
    (B, S, D), detached, to `chunks`; `hidden` concatenates them along the batch (an engine may
    run the batch in chunks of rows, all of the same width)."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.chunks: list[torch.Tensor] = []
        self._handle = None

    def _keep(self, module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self.chunks.append(hidden.detach())

    def __enter__(self) -> "HiddenStateCapture":
        self._handle = self.backbone.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def hidden(self) -> torch.Tensor:
        if not self.chunks:
            raise RuntimeError("the backbone ran no forward while the capture was open")
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)
