"""Flow-Attention layer (Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)):
q, k, v projections, ``ops.flow`` (competition and allocation are its gates), output projection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from gatelab.ops.common.checks import check_choice
from gatelab.ops.flow import BACKENDS, flow, flow_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import Mixer, MixerConfig, check_positive
from ._linear import RecurrentState


@dataclass
class FlowConfig(MixerConfig):
    head_dim: int | None = None  # None: d_model // n_heads
    eps: float = 1e-6
    chunk_size: int = 64
    bias: bool = True  # the official layer's projections have biases

    def __post_init__(self):
        super().__post_init__()
        check_positive("head_dim", self.head_dim, allow_none=True)
        check_positive("chunk_size", self.chunk_size)
        check_choice("backend", self.backend, ("auto", *BACKENDS))
        if not isinstance(self.eps, int | float) or self.eps < 0:
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or give head_dim"
            )

    @property
    def dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


class FlowAttention(Mixer):
    """state = RecurrentState holding a FlowState (tuple of running sums) when causal."""

    config_cls = FlowConfig

    def __init__(self, config: FlowConfig):
        super().__init__(config)
        c = config
        H, D = c.n_heads, c.dim
        self.q_proj = nn.Linear(c.d_model, H * D, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, H * D, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, H * D, bias=c.bias)
        self.o_proj = nn.Linear(H * D, c.d_model, bias=c.bias)

    def _forward(self, x, state, return_internals):
        c = self.config
        B, T, _ = x.shape
        H, D = c.n_heads, c.dim
        if state is not None and not isinstance(state, RecurrentState):
            raise TypeError(
                f"state must be the RecurrentState this mixer returned, got {type(state).__name__}"
            )
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        o, final = flow(
            q,
            k,
            v,
            causal=c.causal,
            eps=c.eps,
            chunk_size=c.chunk_size,
            initial_state=None if state is None else state.state,
            output_final_state=c.causal,
            backend=c.backend,
        )  # (B, T, H, D)
        y = self.o_proj(o.reshape(B, T, H * D))
        start = 0 if state is None else state.length
        new_state = RecurrentState(final, start + T) if c.causal else None
        internals = {}
        if return_internals and state is None:  # the T x T view of this call (no carried past)
            P, allocation, competition = flow_attention_matrix(
                q.detach(), k.detach(), causal=c.causal, eps=c.eps
            )
            internals = {"attn": P, "gate": allocation, "competition": competition}  # gates (B, T, H)
        return y, new_state, internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        """GPT-2 style init: N(0, std), output projection scaled by 1/sqrt(2 * n_layers)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * n_layers))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


register(
    MechanismSpec(
        key="flow",
        family="linear",
        config_cls=FlowConfig,
        module_cls=FlowAttention,
        op=flow,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)",
    )
)
