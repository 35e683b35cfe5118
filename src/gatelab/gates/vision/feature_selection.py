"""Feature-Selection and Hard-Attention Gates (Feature Selection Gates with Gradient Routing for Endoscopic
Image Computing, Roffo et al., 2024): a data-independent sigmoid gate per channel, sigma(w), Xavier
initialised so that it starts near 0.5.

    FSG (CNN feature maps):     F <- F * sigma(w)[None, :, None, None]
    HAG (ViT residual branch):  x <- x + sigma(w) * Branch(LN x)   (the gate on (B, T, C) tokens)

Official code: ``modules/models/multi_stream_nets.py`` (FSGNetR18), ``fsg_vision_transformers.py`` (Block).
The gate is soft; "hard" is only in the name. It is trained with Gradient Routing
(``gatelab.lab.train.routing``): a separate optimizer at a tiny learning rate steps the gates on their own
pass of each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.registry import MechanismSpec, register

from ._checks import check_positive_int


@dataclass
class FeatureSelectionGateConfig:
    channels: int
    channel_dim: int = 1  # 1: feature maps (B, C, H, W) (FSG); -1: tokens (B, T, C) (HAG)

    def __post_init__(self):
        check_positive_int("feature_selection_gate", "channels", self.channels)
        if self.channel_dim not in (1, -1):
            raise ValueError(
                f"feature_selection_gate: channel_dim must be 1 (B, C, H, W) or -1 (B, T, C), got {self.channel_dim!r}"
            )


class FeatureSelectionGate(nn.Module):
    """forward(x) -> x * sigma(w) along ``channel_dim``; ``gate()`` -> sigma(w) (C,) in (0, 1)."""

    def __init__(self, config: FeatureSelectionGateConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(1, config.channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)  # |w| <= sqrt(6 / (1 + C)): sigma(w) close to 0.5

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.weight[0])  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(
                f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.ndim < 2 or x.shape[c.channel_dim] != c.channels:
            layout = "(B, C, ...)" if c.channel_dim == 1 else "(..., C)"
            raise ValueError(
                f"x must have {c.channels} channels at dim {c.channel_dim} {layout}, got shape {tuple(x.shape)}"
            )
        gate = self.gate().to(x.dtype)
        if c.channel_dim == 1:
            gate = gate.view(1, -1, *([1] * (x.ndim - 2)))  # (1, C, 1, ...)
        return x * gate


register(
    MechanismSpec(
        key="feature_selection_gate",
        family="gate",
        config_cls=FeatureSelectionGateConfig,
        module_cls=FeatureSelectionGate,
        paper="Feature Selection Gates with Gradient Routing for Endoscopic Image Computing (Roffo et al., 2024)",
        causal=False,
        notes="FSG / HAG: data-independent sigmoid channel gate; trained with Gradient Routing "
        "(gatelab.lab.train.routing)",
        extra={"input": "feature_map"},
    )
)
