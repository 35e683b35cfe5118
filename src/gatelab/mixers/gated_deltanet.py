"""Gated DeltaNet layer: short convolutions, L2-normalised q/k, the gated delta rule, a gated RMSNorm
output (Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang et al., 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.common.short_conv import short_conv
from gatelab.ops.gated_deltanet import BACKENDS, gated_deltanet, gated_deltanet_attention_matrix, l2_normalize
from gatelab.registry import MechanismSpec, mechanism_key, register

from ._base import MixerConfig, check_positive, gpt2_init
from ._linear import LinearMixer, OpInputs


@dataclass
class GatedDeltaNetConfig(MixerConfig):
    head_dim: int | None = None  # key/query head dim K; None: d_model // n_heads
    expand_v: float = 2.0  # value head dim V = expand_v * K, as the paper's layer
    conv_size: int = 4  # taps of the short causal convolutions on q, k, v
    norm_eps: float = 1e-5
    chunk_size: int = 64
    A_init_range: tuple[float, float] = (1.0, 16.0)  # decay rate A ~ U(range), as Mamba2
    dt_min: float = 0.001  # softplus(dt_bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_positive("head_dim", self.head_dim, allow_none=True)
        check_positive("chunk_size", self.chunk_size)
        if not self.causal:
            # the key of this config's mechanism: subclasses (the Miras memories) are causal recurrences too
            raise ValueError(
                f"{mechanism_key(type(self))} is a causal recurrence; causal=False is not supported"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or give head_dim"
            )
        value_dim = self.expand_v * self.key_dim
        if self.expand_v <= 0 or value_dim != int(value_dim):
            raise ValueError(
                f"expand_v * head_dim must be a positive int, got {self.expand_v} * {self.key_dim}"
            )
        if not isinstance(self.conv_size, int) or isinstance(self.conv_size, bool) or self.conv_size < 2:
            raise ValueError(f"conv_size must be an int >= 2, got {self.conv_size!r}")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.key_dim)


class GatedDeltaNet(LinearMixer):
    """x (B, T, d_model) -> y (B, T, d_model); state: RecurrentState with the (B, H, K, V) fp32 memory and
    the last conv_size - 1 projected q/k/v inputs in ``conv`` ("q", "k": (B, W-1, H*K); "v": (B, W-1, H*V)).

    internals: "gate" alpha = exp(g) (B, T, H), "beta" (B, T, H), and "attn" (B, H, T, T), the matrix with
    o = attn v for the tokens of this call (zero initial state), from the reference recurrence.
    """

    config_cls = GatedDeltaNetConfig
    op = staticmethod(gated_deltanet)

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        c = config
        H, K, V, W = c.n_heads, c.key_dim, c.value_dim, c.conv_size
        self.q_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.k_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.v_proj = nn.Linear(c.d_model, H * V, bias=False)
        self.a_proj = nn.Linear(c.d_model, H, bias=False)  # decay step dt, per head
        self.b_proj = nn.Linear(c.d_model, H, bias=False)  # write strength beta, per head
        self.g_proj = nn.Linear(c.d_model, H * V, bias=False)  # output gate
        self.o_proj = nn.Linear(H * V, c.d_model, bias=False)
        # depthwise conv taps (C, W), the last tap on the current token
        self.q_conv = nn.Parameter(torch.empty(H * K, W))
        self.k_conv = nn.Parameter(torch.empty(H * K, W))
        self.v_conv = nn.Parameter(torch.empty(H * V, W))
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.o_norm_weight = nn.Parameter(torch.ones(V))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        """GPT-2 style projections; conv taps as nn.Conv1d; A and dt_bias as Mamba2."""
        c = self.config
        inputs = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj)
        gpt2_init(inputs, self.o_proj, std, n_layers)
        for w in (self.q_conv, self.k_conv, self.v_conv):
            bound = 1 / math.sqrt(c.conv_size)  # nn.Conv1d's default for a depthwise kernel (fan_in = W)
            nn.init.uniform_(w, -bound, bound)
        with torch.no_grad():
            low, high = c.A_init_range
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(low, high).log())
            log_dt = torch.rand_like(self.dt_bias) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(
                c.dt_min
            )
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
            self.o_norm_weight.fill_(1.0)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) -> log decay g and beta, (B, T, H) fp32.

        g = -exp(A_log) * softplus(x W_a + dt_bias) (Mamba2's discretised decay), beta = sigmoid(x W_b).
        Kept in fp32: a bf16 decay loses its small differences from 0 that long memories live on.
        """
        dt = F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        g = -self.A_log.float().exp() * dt
        beta = torch.sigmoid(self.b_proj(x).float())
        return g, beta

    def convolved(self, x: torch.Tensor, conv: dict[str, torch.Tensor]):
        """x (B, T, d_model) -> q, k (B, T, H*K), v (B, T, H*V) after the short convolutions and SiLU, and the
        convolution inputs to carry ("q", "k", "v")."""
        q, conv_q = short_conv(self.q_proj(x), self.q_conv, state=conv.get("q"), output_final_state=True)
        k, conv_k = short_conv(self.k_proj(x), self.k_conv, state=conv.get("k"), output_final_state=True)
        v, conv_v = short_conv(self.v_proj(x), self.v_conv, state=conv.get("v"), output_final_state=True)
        return q, k, v, {"q": conv_q, "k": conv_k, "v": conv_v}

    def features(self, x, start, conv):
        c = self.config
        B, T, _ = x.shape
        H, K, V = c.n_heads, c.key_dim, c.value_dim
        q, k, v, conv = self.convolved(x, conv)
        q = l2_normalize(q.view(B, T, H, K))  # (B, T, H, K)
        k = l2_normalize(k.view(B, T, H, K))
        g, beta = self.gates(x)  # (B, T, H) fp32
        return OpInputs((q, k, v.view(B, T, H, V), g, beta), conv=conv)

    def gate_output(self, o, x, inputs):
        B, T, H, V = o.shape
        return self.gated_norm(o, self.g_proj(x).view(B, T, H, V)).reshape(B, T, H * V)

    def internals(self, inputs, state):
        q, k, _, g, beta = inputs.args
        with torch.no_grad():
            return {"gate": g.exp(), "beta": beta,
                    "attn": gated_deltanet_attention_matrix(q.detach(), k.detach(), g, beta)}  # fmt: skip

    def state_dims(self):
        c = self.config
        return c.n_heads, c.key_dim, c.value_dim

    def gated_norm(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of o (B, T, H, V) times SiLU of the gate, in fp32 (the paper's output gate)."""
        of = o.float()
        of = (
            of
            * torch.rsqrt(of.square().mean(-1, keepdim=True) + self.config.norm_eps)
            * self.o_norm_weight.float()
        )
        return (of * F.silu(gate.float())).to(o.dtype)


register(
    MechanismSpec(
        key="gated_deltanet",
        family="linear",
        config_cls=GatedDeltaNetConfig,
        module_cls=GatedDeltaNet,
        op=gated_deltanet,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="Gated Delta Networks: Improving Mamba2 with Delta Rule (Yang et al., 2024)",
        notes="q/k/v short convolutions + SiLU, L2-normalised q/k, Mamba2-style decay, gated RMSNorm output",
        extra={"test_options": {"chunk_size": 4}},
    )
)
