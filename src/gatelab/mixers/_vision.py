"""What the vision token mixers share: a bidirectional config and the (B, H, W, C) call convention.

    y, state = mixer(x)          # x (B, H, W, d_model) -> y (B, H, W, d_model), state None

A vision mixer sees the whole map at once: it has no causal form and no decoding state, so it refuses
``causal=True`` when built and any state when called. It registers with ``extra={"spatial_dims": 2}``,
the capability the registry-wide tests read to drive it on maps instead of (B, T, C) sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gatelab.registry import mechanism_key

from ._base import Mixer, MixerConfig, check_choice, check_input


@dataclass
class VisionConfig(MixerConfig):
    causal: bool = False  # a vision mixer sees the whole map; True is refused
    # the mechanism's backends, "reference" (the fp32 definition) first; "auto" runs the last one
    backends: ClassVar[tuple[str, ...]] = ("reference",)

    def __post_init__(self):
        super().__post_init__()
        check_choice("backend", self.backend, ("auto", *self.backends))
        if self.causal:
            raise ValueError(
                f"{mechanism_key(type(self))}: a vision mixer of (B, H, W, C) maps has no causal form; "
                "pass causal=False"
            )

    @property
    def resolved_backend(self) -> str:
        return self.backends[-1] if self.backend == "auto" else self.backend

    @property
    def head_dim(self) -> int:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self.d_model // self.n_heads


class VisionMixer(Mixer):
    """Checks a (B, H, W, d_model) map, refuses a state, then calls ``_forward(x, return_internals)`` which
    returns (y, internals)."""

    def forward(self, x: torch.Tensor, state=None, *, return_internals: bool = False):
        check_input(x, self.config.d_model, 2, "(B, H, W, d_model)")
        if state is not None:
            raise ValueError(
                f"{self.mechanism}: a vision mixer has no decoding state (causal); pass state=None"
            )
        y, internals = self._forward(x, return_internals)
        return (y, None, internals) if return_internals else (y, None)

    def _forward(self, x, return_internals):  # pragma: no cover - abstract
        raise NotImplementedError


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) for the convolutions."""
    return x.permute(0, 3, 1, 2)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C)."""
    return x.permute(0, 2, 3, 1)


def conv_map(conv, x: torch.Tensor) -> torch.Tensor:
    """A 2D convolution (channels first) applied to a (B, H, W, C) map."""
    return channels_last(conv(channels_first(x)))


def gate_output(o: torch.Tensor, gate: torch.Tensor, internals: dict, return_internals: bool) -> torch.Tensor:
    """o ⊙ gate, the activated gate kept in internals["gate"] when asked for."""
    if return_internals:
        internals["gate"] = gate
    return o * gate


__all__ = ["VisionConfig", "VisionMixer", "channels_first", "channels_last", "conv_map", "gate_output"]
