"""Gated attention heads: one sigmoid gate per token and head, computed from that head's own slice of the
layer input, scales the head's output so a head can "do nothing" without attention sinks.
"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing" (Bondarenko et al., 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.gated_softmax import BACKENDS, gated_softmax
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer
from ._base import check_positive, check_probability


@dataclass
class GatedHeadsConfig(AttentionConfig):
    pi_init: float = 0.25  # initial gate value: bias = logit(pi_init); the paper's OPT runs use 0.25
    mlp_hidden: int | None = (
        None  # None: Linear(d_head -> 1); an int: Linear(d_head -> h) -> ReLU -> Linear(h -> 1)
    )

    def __post_init__(self):
        super().__post_init__()
        check_probability("pi_init", self.pi_init)
        check_positive("mlp_hidden", self.mlp_hidden, allow_none=True)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"gated heads read d_model / n_heads slices: d_model ({self.d_model}) must divide by n_heads"
            )


class GatedHeadsAttention(AttentionMixer):
    """Each head h gets gate pi_h(x) = sigmoid(f_h(x[..., h-th slice])) (B, T, H, 1) on its output."""

    config_cls = GatedHeadsConfig

    def __init__(self, config: GatedHeadsConfig):
        super().__init__(config)
        c = config
        H, slice_dim = c.n_heads, c.d_model // c.n_heads
        hidden = c.mlp_hidden or 1
        # Per-head weights held as batched tensors: (H, slice_dim, hidden) instead of H small Linear modules.
        self.gate_w1 = nn.Parameter(torch.empty(H, slice_dim, hidden))
        self.gate_b1 = nn.Parameter(torch.empty(H, hidden))
        if c.mlp_hidden:
            self.gate_w2 = nn.Parameter(torch.empty(H, hidden, 1))
            self.gate_b2 = nn.Parameter(torch.empty(H, 1))
        self.reset_gate()

    def reset_gate(self) -> None:
        c = self.config
        bound = 1 / math.sqrt(self.gate_w1.shape[1])  # nn.Linear's default init
        nn.init.uniform_(self.gate_w1, -bound, bound)
        logit = math.log(c.pi_init / (1 - c.pi_init))
        if c.mlp_hidden:
            nn.init.uniform_(self.gate_b1, -bound, bound)
            nn.init.uniform_(self.gate_w2, -1 / math.sqrt(c.mlp_hidden), 1 / math.sqrt(c.mlp_hidden))
            nn.init.constant_(self.gate_b2, logit)
        else:
            nn.init.constant_(self.gate_b1, logit)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) -> gate logits (B, T, H, 1), head h reading x's h-th slice."""
        B, T, _ = x.shape
        xh = x.view(B, T, self.config.n_heads, -1)  # (B, T, H, d_model / H)
        g = torch.einsum("bthd,hde->bthe", xh, self.gate_w1) + self.gate_b1
        if self.config.mlp_hidden:
            g = torch.einsum("bthd,hde->bthe", torch.relu(g), self.gate_w2) + self.gate_b2
        return g  # (B, T, H, 1)

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        gate = self.gate_logits(x)
        o = gated_softmax(q, k, v, gate, causal=c.causal, backend=c.backend)
        internals = self.probs(q, k) if want_internals else {}
        if want_internals:
            internals["gate"] = torch.sigmoid(gate.detach())
        return o, internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        self.reset_gate()


register(
    MechanismSpec(
        key="gated_heads",
        family="softmax",
        config_cls=GatedHeadsConfig,
        module_cls=GatedHeadsAttention,
        op=gated_softmax,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Quantizable Transformers (Bondarenko et al., 2023)",
        notes="the paper's gated attention: per-token, per-head sigmoid gate from the head's input slice",
    )
)
