"""Activator's gating unit as a (B, H, W, C) mixer (Activator: GLU Activation Function as the Core
Component of a Vision Transformer, 2024; code github.com/Abdullah-88/Activator).

    y = W3(LN(GELU(W1 x)) ⊙ LN(W2 x))        one LayerNorm shared by both branches, as the code has it

It mixes channels only: every token is transformed on its own, so permuting the tokens permutes the
outputs. The paper presents the unit as the attention replacement of its blocks; the public code
(``activator.py``, ``ActivatorGatingUnit``) has no token mixing at all, and this follows the code. It is
registered as a vision mixer so that a backbone can compare it, as a no-mixing GLU baseline, with the
token mixers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.registry import MechanismSpec, register

from ._base import check_positive
from ._vision import VisionConfig, VisionMixer


@dataclass
class ActivatorConfig(VisionConfig):
    backends = ("reference", "torch")
    hidden_dim: int | None = None  # None: 4 * d_model (the code's d_ffn)

    def __post_init__(self):
        super().__post_init__()
        check_positive("hidden_dim", self.hidden_dim, allow_none=True)

    @property
    def hidden(self) -> int:
        return self.hidden_dim or 4 * self.d_model


def activator_reference(x, w1, b1, w2, b2, w3, b3, norm_weight, norm_bias, eps: float = 1e-5):
    """The definition in fp32: x (..., C), w1, w2 (F, C), w3 (C, F), norm over F -> (..., C)."""
    x = x.float()

    def norm(h):  # the one shared LayerNorm
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).square().mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * norm_weight.float() + norm_bias.float()

    u = norm(F.gelu(x @ w1.float().T + b1.float()))
    v = norm(x @ w2.float().T + b2.float())
    return (u * v) @ w3.float().T + b3.float()


class Activator(VisionMixer):
    config_cls = ActivatorConfig

    def __init__(self, config: ActivatorConfig):
        super().__init__(config)
        C, hidden = config.d_model, config.hidden
        self.proj_1 = nn.Linear(C, hidden)
        self.proj_2 = nn.Linear(C, hidden)
        self.proj_3 = nn.Linear(hidden, C)
        self.norm = nn.LayerNorm(hidden)

    def _forward(self, x, return_internals):
        if self.config.resolved_backend == "reference":
            p = (self.proj_1, self.proj_2, self.proj_3)
            y = activator_reference(
                x, *(t for lin in p for t in (lin.weight, lin.bias)), self.norm.weight, self.norm.bias,
                self.norm.eps,
            ).to(x.dtype)  # fmt: skip
        else:
            y = self.proj_3(self.norm(F.gelu(self.proj_1(x))) * self.norm(self.proj_2(x)))
        return y, {}


register(
    MechanismSpec(
        key="activator",
        family="vision",
        config_cls=ActivatorConfig,
        module_cls=Activator,
        backends=ActivatorConfig.backends,
        causal=False,
        bidirectional=True,
        paper="Activator: GLU Activation Function as the Core Component of a Vision Transformer (2024)",
        notes="(B, H, W, C) maps; mixes channels only (the public code has no token mixing): a GLU baseline",
        extra={"spatial_dims": 2},
    )
)
