"""Additive attention gate of attention-gated U-Nets (Attention U-Net: Learning Where to Look for the
Pancreas, Oktay et al., 2018; as used by AGUNet and EAR-U-Net): a gating signal g from a coarser scale
decides which positions of the skip features x pass.

    q = psi^T ReLU(W_x x + W_g g + b) + b_psi,   alpha = sigmoid(q) resampled to x's grid,   out = alpha * x

Official code (``grid_attention_layer.py``): W_x is a strided conv (``sub_sample``, default 2) without bias,
W_g a 1x1 conv with bias b, W_g g is bilinearly resampled to the grid of W_x x, alpha back to x's grid.
The output transform of the official code (1x1 conv + BatchNorm after the gate) is left to the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.registry import MechanismSpec, register

from ._checks import check_map, check_positive_int


@dataclass
class GridAttentionGateConfig:
    x_channels: int  # channels of the gated features x
    g_channels: int  # channels of the gating signal g (a coarser scale)
    inter_channels: int | None = None  # None: x_channels // 2 (at least 1), the official default
    sub_sample: int = 2  # W_x's kernel and stride: the grid the gate is computed on (1 = x's own grid)

    def __post_init__(self):
        for name in ("x_channels", "g_channels", "sub_sample"):
            check_positive_int("grid_attention_gate", name, getattr(self, name))
        if self.inter_channels is None:
            self.inter_channels = max(1, self.x_channels // 2)
        check_positive_int("grid_attention_gate", "inter_channels", self.inter_channels)


class GridAttentionGate(nn.Module):
    """forward(x (B, Cx, H, W), g (B, Cg, h, w)) -> (alpha * x (B, Cx, H, W), alpha (B, 1, H, W) in [0, 1])."""

    def __init__(self, config: GridAttentionGateConfig):
        super().__init__()
        c = self.config = config
        s = c.sub_sample
        self.theta = nn.Conv2d(c.x_channels, c.inter_channels, kernel_size=s, stride=s, bias=False)  # W_x
        self.phi = nn.Conv2d(c.g_channels, c.inter_channels, kernel_size=1, bias=True)  # W_g, b
        self.psi = nn.Conv2d(c.inter_channels, 1, kernel_size=1, bias=True)  # psi, b_psi

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        check_map(x, "x", c.x_channels)
        check_map(g, "g (the gating signal)", c.g_channels)
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"x and g must share the batch size, got {x.shape[0]} and {g.shape[0]}")
        if x.shape[2] < c.sub_sample or x.shape[3] < c.sub_sample:
            raise ValueError(f"x's map {tuple(x.shape[2:])} is smaller than sub_sample={c.sub_sample}")
        theta_x = self.theta(x)  # (B, inter, H / s, W / s)
        phi_g = F.interpolate(self.phi(g), size=theta_x.shape[2:], mode="bilinear", align_corners=False)
        q = self.psi(F.relu(theta_x + phi_g))  # (B, 1, H / s, W / s)
        alpha = torch.sigmoid(q)
        if alpha.shape[2:] != x.shape[2:]:
            alpha = F.interpolate(alpha, size=x.shape[2:], mode="bilinear", align_corners=False)
        return alpha * x, alpha


register(
    MechanismSpec(
        key="grid_attention_gate",
        family="gate",
        config_cls=GridAttentionGateConfig,
        module_cls=GridAttentionGate,
        paper="Attention U-Net: Learning Where to Look for the Pancreas (Oktay et al., 2018)",
        causal=False,
        notes="feature-map gate (B, C, H, W), gating signal from a coarser scale; AGUNet, EAR-U-Net",
        extra={"input": "feature_map"},
    )
)
