"""Gated softmax attention: a sigmoid gate computed from the token's own hidden state modulates the
attention output, Y' = Y * sigmoid(X W). "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free" (Qiu et al., 2025); Qwen3-Next uses G1 elementwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.common.checks import check_choice
from gatelab.ops.gated_softmax import (
    BACKENDS,
    COMBINES,
    GATE_FUNCTIONS,
    apply_gate,
    gate_activation,
    gated_softmax,
)
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer


@dataclass
class GatedSoftmaxConfig(AttentionConfig):
    gate: str = "elementwise"  # "elementwise": one gate per channel; "headwise": one scalar per head
    position: str = "output"  # "output": G1, after SDPA (the paper's best); "value": G2, on the values
    gate_fn: str = "sigmoid"  # "sigmoid", "silu", "ns_sigmoid" (0.5 + 0.5 sigmoid, an ablation)
    combine: str = "multiply"  # "multiply" or "add"
    sharing: str = "per_head"  # "per_head"; "head_shared": one gate vector shared by all heads
    input_dependent: bool = True  # False: a learned constant gate per head (an ablation)
    fused: str | None = (
        None  # one projection emits q and gate: "grouped" (paper's code) or "per_head" (Qwen3-Next)
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("gate", self.gate, ("elementwise", "headwise"))
        check_choice("position", self.position, ("output", "value"))
        check_choice("gate_fn", self.gate_fn, GATE_FUNCTIONS)
        check_choice("combine", self.combine, COMBINES)
        check_choice("sharing", self.sharing, ("per_head", "head_shared"))
        check_choice("fused", self.fused, (None, "grouped", "per_head"))
        if self.fused and (
            self.position != "output" or self.sharing != "per_head" or not self.input_dependent
        ):
            raise ValueError(
                "fused q/gate projection needs position='output', sharing='per_head' and input_dependent=True, "
                f"got position={self.position!r}, sharing={self.sharing!r}, input_dependent={self.input_dependent}"
            )

    @property
    def gate_dim(self) -> int:
        return self.dim if self.gate == "elementwise" else 1


class GatedSoftmaxAttention(AttentionMixer):
    """Softmax attention with a query-dependent gate; gate logits are (B, T, heads, D) or (B, T, heads, 1)."""

    config_cls = GatedSoftmaxConfig

    def __init__(self, config: GatedSoftmaxConfig):
        super().__init__(config)
        c = config
        heads = c.n_heads if c.position == "output" else c.kv_heads
        if c.fused:
            pass  # the gate columns live in q_proj (extra_query_features)
        elif not c.input_dependent:
            self.gate_logits = nn.Parameter(torch.zeros(heads, c.gate_dim))
        else:
            out = c.gate_dim if c.sharing == "head_shared" else heads * c.gate_dim
            self.gate_proj = nn.Linear(c.d_model, out, bias=c.bias)

    def extra_query_features(self) -> int:
        c = self.config
        return c.n_heads * c.gate_dim if c.fused else 0

    def split_query(self, q_out):
        c = self.config
        B, T, _ = q_out.shape
        H, Hkv, D, G = c.n_heads, c.kv_heads, c.dim, c.gate_dim
        if c.fused == "grouped":  # per KV group: [queries of the group's heads | their gates]
            grouped = q_out.view(B, T, Hkv, -1)
            q, g = grouped.split([H // Hkv * D, H // Hkv * G], dim=-1)
            return q.reshape(B, T, H, D), g.reshape(B, T, H, G)
        if c.fused == "per_head":  # per query head: [q_h | g_h]
            q, g = q_out.view(B, T, H, D + G).split([D, G], dim=-1)
            return q, g
        return q_out.view(B, T, H, D), None

    def gate_logits_for(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """Gate logits (B, T, heads, gate_dim) from the mixer input x (B, T, d_model)."""
        c = self.config
        B, T, _ = x.shape
        if not c.input_dependent:
            return self.gate_logits.expand(B, T, heads, c.gate_dim)
        g = self.gate_proj(x)
        if c.sharing == "head_shared":
            return g.view(B, T, 1, c.gate_dim).expand(B, T, heads, c.gate_dim)
        return g.view(B, T, heads, c.gate_dim)

    def prepare_kv(self, k, v, x):
        c = self.config
        if c.position == "value":  # G2: gate the values before they are cached
            self._value_gate = self.gate_logits_for(x, c.kv_heads)
            v = apply_gate(v, self._value_gate, c.gate_fn, c.combine)
        return k, v

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        if c.position == "value":
            o, internals = super().attend(q, k, v, x, extra, want_internals)
            gate = self._value_gate
            del self._value_gate
        else:
            gate = extra if extra is not None else self.gate_logits_for(x, c.n_heads)
            o = gated_softmax(
                q, k, v, gate, causal=c.causal, gate_fn=c.gate_fn, combine=c.combine, backend=c.backend
            )
            internals = self.probs(q, k) if want_internals else {}
        if want_internals:
            internals["gate"] = gate_activation(gate.detach(), c.gate_fn)
        return o, internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        if hasattr(self, "gate_proj"):
            nn.init.normal_(self.gate_proj.weight, std=std)
            if self.gate_proj.bias is not None:
                nn.init.zeros_(self.gate_proj.bias)


register(
    MechanismSpec(
        key="gated_softmax",
        family="softmax",
        config_cls=GatedSoftmaxConfig,
        module_cls=GatedSoftmaxAttention,
        op=gated_softmax,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Gated Attention for Large Language Models (Qiu et al., 2025)",
    )
)
