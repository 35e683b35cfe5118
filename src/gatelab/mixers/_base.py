"""What every mixer shares: the config base class and the call convention.

    y, state = mixer(x, state=None)                         # x (B, T, d_model) -> y (B, T, d_model)
    y, state, internals = mixer(x, state, return_internals=True)

``state`` is whatever the mixer needs to continue the sequence (a KV cache, a recurrent state):
running a prefix and then continuing token by token gives the outputs of one parallel pass.
``internals`` is a dict for diagnostics, e.g. "attn" (B, H, T, S) probabilities and "gate" values;
it is only computed when asked for, so the normal path pays nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from gatelab.ops.common.checks import check_choice


@dataclass
class MixerConfig:
    d_model: int = 256
    n_heads: int = 4
    causal: bool = True
    backend: str = "auto"

    def __post_init__(self):
        for name in ("d_model", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_probability(name: str, value: float, low_open: bool = True, high_open: bool = True) -> None:
    ok = (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not isinstance(value, int | float) or not ok:
        raise ValueError(
            f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}"
        )


@dataclass
class HeadDimConfig(MixerConfig):
    """A config with one head dim for q, k and v: ``head_dim`` or, when None, d_model // n_heads."""

    head_dim: int | None = None  # None: d_model // n_heads

    def __post_init__(self):
        super().__post_init__()
        check_positive("head_dim", self.head_dim, allow_none=True)
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or give head_dim"
            )

    @property
    def dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class HeadsConfig(HeadDimConfig):
    """Adds grouped-query heads: ``n_kv_heads`` key/value heads (None: as many as n_heads)."""

    n_kv_heads: int | None = None  # None: as many as n_heads; fewer gives grouped-query attention

    def __post_init__(self):
        super().__post_init__()
        check_positive("n_kv_heads", self.n_kv_heads, allow_none=True)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def gpt2_init(inputs: Iterable[nn.Linear], output: nn.Linear, std: float, n_layers: int) -> None:
    """GPT-2 style init: weights N(0, std), the output projection's scaled by 1/sqrt(2 * n_layers); zero
    biases."""
    inputs = tuple(inputs)
    for lin in inputs:
        nn.init.normal_(lin.weight, std=std)
    nn.init.normal_(output.weight, std=std / math.sqrt(2 * n_layers))
    for lin in (*inputs, output):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


class Mixer(nn.Module):
    """Base class: validates the input and the state, then calls ``_forward``."""

    config_cls: type = MixerConfig

    def __init__(self, config: MixerConfig):
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def forward(self, x: torch.Tensor, state=None, *, return_internals: bool = False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"x must have shape (B, T, {self.config.d_model}) (B, T, d_model), got {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one token (T >= 1)")
        if state is not None and not self.config.causal:
            raise ValueError("a state (decoding) needs a causal mixer; this one was built with causal=False")
        y, state, internals = self._forward(x, state, return_internals)
        return (y, state, internals) if return_internals else (y, state)

    def _forward(self, x, state, return_internals):  # pragma: no cover - abstract
        raise NotImplementedError


__all__ = [
    "MixerConfig",
    "HeadDimConfig",
    "HeadsConfig",
    "Mixer",
    "gpt2_init",
    "check_positive",
    "check_probability",
    "check_choice",
]
