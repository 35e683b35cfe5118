"""What the linear-attention mixers share: the decoding state they carry between calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RecurrentState:
    """State a recurrent mixer carries between calls.

    state: the recurrent memory, (B, H, K, V) fp32 for linear attention (or a tuple of tensors where the
    mechanism needs more, e.g. running normalisers); conv: the last inputs of short causal convolutions
    (B, kernel - 1, C) or None; length: tokens seen so far.
    """

    state: torch.Tensor | tuple[torch.Tensor, ...]
    length: int
    conv: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = self.state if isinstance(self.state, tuple) else (self.state,)
        tensors = tensors + tuple(self.conv.values())
        return sum(t.numel() * t.element_size() for t in tensors)
