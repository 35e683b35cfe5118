"""LINA linear attention layer: ReLU features, division-based normalisation and the KV gate (LINA: Linear
Autoregressive Image Generative Models with Continuous Tokens (Wang et al., 2026)).

The KV gate (``gate="kv"``) is the paper's: learned scales per head and per token position on phi(k) and v,
initialised to 1, unconstrained, as its public code (parameters (H, N) for a fixed N; here ``max_len``).
``gate="input"`` is an input-dependent variant (an extension, not in the paper): per head and token,
g = 2 sigmoid(x W + b) with W = 0, b = 0 at init, so it starts at 1 like the paper's parameters and stays
positive, which keeps the normaliser positive. ``gate="none"`` is plain normalised linear attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.common.checks import check_choice
from gatelab.ops.lina import BACKENDS, FEATURE_MAPS, lina, lina_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import HeadDimConfig, check_positive
from ._linear import OpInputs, QKVLinearMixer

GATES = ("kv", "input", "none")


@dataclass
class LinaConfig(HeadDimConfig):
    gate: str = "kv"  # "kv": LINA's per-(head, position) scales; "input": from x; "none"
    max_len: int = 1024  # positions the "kv" gate has parameters for (the lab LM's default max_seq_len)
    feature_map: str = "relu"  # LINA's ReLU + 1e-6; "elu" (ELU + 1)
    eps: float = 1e-6
    chunk_size: int = 64
    bias: bool = True  # LINA's qkv projection has a bias

    def __post_init__(self):
        super().__post_init__()
        check_positive("max_len", self.max_len)
        check_positive("chunk_size", self.chunk_size)
        check_choice("gate", self.gate, GATES)
        check_choice("feature_map", self.feature_map, FEATURE_MAPS[:2])
        check_choice("backend", self.backend, ("auto", *BACKENDS))
        if not isinstance(self.eps, int | float) or self.eps < 0:
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")


class LinaAttention(QKVLinearMixer):
    """q, k, v projections, the KV gate, ``ops.lina``, output projection; state = RecurrentState with the
    (B, H, K, V+1) sums (S and the normaliser z) when causal."""

    config_cls = LinaConfig
    op = staticmethod(lina)

    def __init__(self, config: LinaConfig):
        super().__init__(config)
        c = config
        H = c.n_heads
        if c.gate == "kv":
            self.key_scale = nn.Parameter(torch.ones(H, c.max_len))  # (H, N), ones as the paper's code
            self.value_scale = nn.Parameter(torch.ones(H, c.max_len))
        elif c.gate == "input":
            self.gate_proj = nn.Linear(c.d_model, 2 * H)
            nn.init.zeros_(self.gate_proj.weight)  # gates start at exactly 1
            nn.init.zeros_(self.gate_proj.bias)

    def gates(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Key and value gates (B, T, H) for the tokens at positions start .. start + T - 1."""
        c = self.config
        B, T, _ = x.shape
        if c.gate == "none":
            return None, None
        if c.gate == "input":
            g = 2.0 * torch.sigmoid(self.gate_proj(x)).view(B, T, 2, c.n_heads)
            return g[:, :, 0], g[:, :, 1]
        if start + T > c.max_len:
            raise ValueError(
                f"lina: the 'kv' gate has parameters for max_len={c.max_len} positions, got positions up to "
                f"{start + T}; build with a larger max_len or use gate='input'"
            )
        scales = lambda p: p[:, start : start + T].t()[None].expand(B, T, c.n_heads)  # (B, T, H)
        return scales(self.key_scale), scales(self.value_scale)

    def features(self, x, start, conv):
        c = self.config
        q, k, v = self.project_qkv(x)  # (B, T, H, D)
        key_gate, value_gate = self.gates(x, start)
        if key_gate is not None:
            key_gate, value_gate = key_gate.to(q.dtype), value_gate.to(q.dtype)
        options = dict(key_gate=key_gate, value_gate=value_gate, causal=c.causal, feature_map=c.feature_map,
                       eps=c.eps)  # fmt: skip
        return OpInputs((q, k, v), options)

    def internals(self, inputs, state):
        c = self.config
        q, k, _ = inputs.args
        key_gate, value_gate = inputs.options["key_gate"], inputs.options["value_gate"]
        ones = torch.ones(q.shape[:3], device=q.device)  # (B, T, H)
        gk = ones if key_gate is None else key_gate.detach().float()
        gv = ones if value_gate is None else value_gate.detach().float()
        internals = {"gate": torch.stack([gk, gv], dim=-1)}  # (B, T, H, 2): key gate, value gate
        if state is None:  # the T x T matrix of this call; with a carried state the past is not in it
            P = lina_attention_matrix(
                q.detach(), k.detach(), gk, causal=c.causal, feature_map=c.feature_map, eps=c.eps
            )
            internals["attn"] = P * gv.permute(0, 2, 1)[:, :, None, :]  # o_t = sum_s attn[t, s] v_s
        return internals


register(
    MechanismSpec(
        key="lina",
        family="linear",
        config_cls=LinaConfig,
        module_cls=LinaAttention,
        op=lina,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="LINA: Linear Autoregressive Image Generative Models with Continuous Tokens (Wang et al., 2026)",
        notes="gate='kv' (paper, per head and position, needs max_len), 'input' (input-dependent), 'none'",
        extra={"test_options": {"max_len": 64}},
    )
)
