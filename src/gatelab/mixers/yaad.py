"""Yaad layer: the Miras memory with a Huber attentional bias whose threshold depends on the input
(It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization, Behrouz et al., 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.yaad import BACKENDS, yaad
from gatelab.registry import MechanismSpec, register

from ._miras import MirasConfig, MirasMixer


@dataclass
class YaadConfig(MirasConfig):
    pass


class Yaad(MirasMixer):
    """internals add "delta" (B, T, H), the Huber threshold softplus(x W_d + b_d), per head."""

    config_cls = YaadConfig
    op = staticmethod(yaad)

    def __init__(self, config: YaadConfig):
        super().__init__(config)
        self.d_proj = nn.Linear(config.d_model, config.n_heads, bias=True)
        self.reset_threshold()

    def reset_threshold(self) -> None:
        """Starts near delta = 1 for every token (unit keys, values of norm about 1)."""
        nn.init.normal_(self.d_proj.weight, std=0.02)
        nn.init.constant_(self.d_proj.bias, math.log(math.e - 1))  # softplus^{-1}(1)

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        if hasattr(self, "d_proj"):  # the base __init__ calls this before d_proj exists
            self.reset_threshold()

    def extra_gates(self, x):
        return (F.softplus(self.d_proj(x).float()) + 1e-4,)  # > 0, as the op requires

    def internals(self, inputs, state):
        return {**super().internals(inputs, state), "delta": inputs.args[5].detach()}


register(
    MechanismSpec(
        key="yaad",
        family="linear",
        config_cls=YaadConfig,
        module_cls=Yaad,
        op=yaad,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="It's All Connected: Test-Time Memorization, Attentional Bias, Retention (Behrouz et al., 2025)",
        notes="matrix memory, Huber bias with threshold softplus(x W_d), chunk-start gradients (chunk 16)",
        # as moneta: decoding equals the parallel form only at chunk 1
        extra={"test_options": {"chunk_size": 1}},
    )
)
