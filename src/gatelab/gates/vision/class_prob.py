"""Class-probability self-gate (Multi-scale Adversarial Attention Gates, Valvano et al., 2021): a 1x1 conv
predicts class probabilities at the gate's own scale and the features pass where something that is not
background is predicted.

    A = softmax_c(conv1x1(h)),   a = sum_{c >= 1} A[c] = 1 - P(background),   out = conv3x3(h) * a

(official code ``architectures/multi_res_segmentor.py``; the adversarial discriminator fed with A is a
training procedure left out here). Class 0 is the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.registry import MechanismSpec, register

from ._checks import check_map, check_positive_int


@dataclass
class ClassProbGateConfig:
    channels: int
    n_classes: int  # including the background, class 0

    def __post_init__(self):
        check_positive_int("class_prob_gate", "channels", self.channels)
        if not isinstance(self.n_classes, int) or isinstance(self.n_classes, bool) or self.n_classes < 2:
            raise ValueError(
                f"class_prob_gate: n_classes must be an int >= 2 (background + one), got {self.n_classes!r}"
            )


class ClassProbGate(nn.Module):
    """forward(h (B, C, H, W)) -> (out (B, C, H, W), a (B, 1, H, W) in [0, 1], A (B, n_classes, H, W))."""

    def __init__(self, config: ClassProbGateConfig):
        super().__init__()
        c = self.config = config
        self.classifier = nn.Conv2d(c.channels, c.n_classes, kernel_size=1)
        self.conv = nn.Conv2d(c.channels, c.channels, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_map(h, "h", self.config.channels)
        probs = torch.softmax(self.classifier(h).float(), dim=1)  # (B, n_classes, H, W), fp32 softmax
        # the sum of the foreground classes, not 1 - P(bg): no cancellation where P(bg) is close to 1
        a = probs[:, 1:].sum(dim=1, keepdim=True).to(h.dtype)  # (B, 1, H, W)
        return self.conv(h) * a, a, probs


register(
    MechanismSpec(
        key="class_prob_gate",
        family="gate",
        config_cls=ClassProbGateConfig,
        module_cls=ClassProbGate,
        paper="Learning to Segment from Scribbles using Multi-scale Adversarial Attention Gates "
        "(Valvano et al., 2021)",
        causal=False,
        notes="feature-map gate (B, C, H, W): a = 1 - P(background) from a 1x1 conv's softmax",
        extra={"input": "feature_map"},
    )
)
