"""Gated linear attention layer (Gated Linear Attention Transformers with Hardware-Efficient Training
(Yang et al., 2023)).

As the paper (sec. 4.4): q, k of width d_k = d/2 and v of width d_v = d, split into heads; a low-rank
(16) key-wise forget gate alpha_t = sigmoid(x W1 W2 + b)^(1/16), passed to the op in log space as
log alpha_t = logsigmoid(x W1 W2 + b) / 16; the output is per-head RMSNorm(o) * swish(x W_r), then W_o.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.gla import BACKENDS, gla, gla_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import MixerConfig, check_choice, check_positive, gpt2_init
from ._linear import LinearMixer, RecurrentState


@dataclass
class GlaConfig(MixerConfig):
    expand_k: float = 0.5  # d_k = expand_k * d_model (paper: d/2)
    expand_v: float = 1.0  # d_v = expand_v * d_model (paper: d)
    gate_low_rank: int = 16  # rank of the forget-gate projection W1 W2
    gate_normalizer: float = 16.0  # log alpha = logsigmoid(.) / gate_normalizer
    norm_eps: float = 1e-5
    chunk_size: int | None = None  # None: the op's per-backend default (gatelab.ops.gla.CHUNK_SIZE)

    def __post_init__(self):
        super().__post_init__()
        if not self.causal:
            raise ValueError("gla is a causal (decoder) mixer; causal=False is not supported")
        check_positive("gate_low_rank", self.gate_low_rank)
        if self.chunk_size is not None:
            check_positive("chunk_size", self.chunk_size)
        check_choice("backend", self.backend, ("auto", *BACKENDS))
        for name in ("expand_k", "expand_v", "gate_normalizer", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name, width in (("expand_k", self.key_dim), ("expand_v", self.value_dim)):
            if width < self.n_heads or width % self.n_heads or width != getattr(self, name) * self.d_model:
                raise ValueError(
                    f"{name} * d_model = {getattr(self, name) * self.d_model} must be a whole multiple of "
                    f"n_heads ({self.n_heads})"
                )

    @property
    def key_dim(self) -> int:
        return int(self.expand_k * self.d_model)

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.d_model)


class GatedLinearAttention(LinearMixer):
    """Projections, the low-rank forget gate, ``ops.gla``, per-head RMSNorm and swish output gate; the
    decoding state is a RecurrentState holding the (B, H, K, V) fp32 memory."""

    config_cls = GlaConfig

    def __init__(self, config: GlaConfig):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.value_dim, bias=False)
        self.r_proj = nn.Linear(c.d_model, c.value_dim, bias=False)  # output gate, swish
        self.gate_down = nn.Linear(c.d_model, c.gate_low_rank, bias=False)  # W1
        self.gate_up = nn.Linear(c.gate_low_rank, c.key_dim, bias=True)  # W2, b
        self.norm = nn.RMSNorm(c.value_dim // c.n_heads, eps=c.norm_eps)  # per head, shared across heads
        self.o_proj = nn.Linear(c.value_dim, c.d_model, bias=False)

    def log_forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """log alpha (B, T, H, K) = logsigmoid(x W1 W2 + b) / normalizer, computed in fp32."""
        B, T, _ = x.shape
        logits = self.gate_up(self.gate_down(x)).float()
        return (F.logsigmoid(logits) / self.config.gate_normalizer).view(B, T, self.config.n_heads, -1)

    def _forward(self, x, state, return_internals):
        c = self.config
        B, T, _ = x.shape
        H = c.n_heads
        initial_state, start = self.carried(state)
        q = self.q_proj(x).view(B, T, H, -1)  # (B, T, H, K)
        k = self.k_proj(x).view(B, T, H, -1)
        v = self.v_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        g = self.log_forget_gate(x)  # (B, T, H, K) fp32
        o, final = gla(
            q,
            k,
            v,
            g,
            initial_state=initial_state,
            output_final_state=True,
            chunk_size=c.chunk_size,
            backend=self.step_backend(x),
        )  # (B, T, H, V)
        o = self.norm(o) * F.silu(self.r_proj(x).view(B, T, H, -1))
        y = self.o_proj(o.reshape(B, T, -1))
        internals = {}
        if return_internals:
            internals["gate"] = g.detach().exp()  # alpha (B, T, H, K)
            if state is None:  # the T x T operator of this call; with a carried state the past is not in it
                internals["attn"] = gla_attention_matrix(q.detach(), k.detach(), g.detach())  # (B, H, T, T)
        return y, RecurrentState(final, start + T), internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        """GPT-2 style init for the projections; the forget gate keeps PyTorch's default init."""
        gpt2_init((self.q_proj, self.k_proj, self.v_proj, self.r_proj), self.o_proj, std, n_layers)


register(
    MechanismSpec(
        key="gla",
        family="linear",
        config_cls=GlaConfig,
        module_cls=GatedLinearAttention,
        op=gla,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="Gated Linear Attention Transformers with Hardware-Efficient Training (Yang et al., 2023)",
        notes="d_k = d/2, d_v = d, rank-16 key-wise forget gate (normaliser 16), RMSNorm + swish output gate",
        extra={"test_options": {"chunk_size": 8}},
    )
)
