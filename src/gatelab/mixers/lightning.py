"""Lightning attention layer: linear attention with a fixed per-head decay (TransNormerLLM: A Faster and
Better Large Language Model with Improved TransNormer (Qin et al., 2023); Lightning Attention-2 (Qin et
al., 2024)).

As TransNormerLLM's reference code: q = swish(x W_q), k = swish(x W_k), v = x W_v, no score scale; head h
(1..H) decays by lambda_h = exp(-2^(-8h/H)) (ALiBi's slopes), scaled per layer by (1 - l/(L-1) + 1e-5)
so the first layer forgets fastest; the output is RMSNorm over all heads (the weightless "SRMSNorm"),
times the gate u = x W_u ("linear", TransNormerLLM) or sigmoid(x W_u) ("sigmoid", as MiniMax-01's
lightning layers), then W_o. The relative position encoding (LRPE) of TransNormerLLM is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.lightning import BACKENDS, alibi_slopes, lightning, lightning_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import HeadDimConfig, check_choice, check_positive, gpt2_init
from ._linear import LinearMixer, RecurrentState

OUTPUT_GATES = ("linear", "sigmoid")


@dataclass
class LightningConfig(HeadDimConfig):
    layer_idx: int = 0  # this layer's index l and the model's depth L set the decay scale
    n_layers: int = 1
    output_gate: str = "linear"  # "linear" (TransNormerLLM) or "sigmoid" (MiniMax-01)
    norm_eps: float = 1e-6
    chunk_size: int = 64
    bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.causal:
            raise ValueError("lightning is a causal (decoder) mixer; causal=False is not supported")
        check_positive("n_layers", self.n_layers)
        check_positive("chunk_size", self.chunk_size)
        check_choice("output_gate", self.output_gate, OUTPUT_GATES)
        check_choice("backend", self.backend, ("auto", *BACKENDS))
        if not isinstance(self.layer_idx, int) or not 0 <= self.layer_idx < self.n_layers:
            raise ValueError(
                f"layer_idx must be an int in [0, n_layers={self.n_layers}), got {self.layer_idx!r}"
            )


def lightning_log_decay(n_heads: int, layer_idx: int = 0, n_layers: int = 1) -> torch.Tensor:
    """TransNormerLLM's per-head log decay (H,): -slope_h * (1 - l / (L - 1) + 1e-5)."""
    depth = 1.0 - layer_idx / (n_layers - 1) if n_layers > 1 else 1.0
    return -alibi_slopes(n_heads) * (depth + 1e-5)


class LightningAttention(LinearMixer):
    """q/k/v/u projections, ``ops.lightning`` with the fixed decays, norm, output gate, W_o; the decoding
    state is a RecurrentState holding the (B, H, D, D) fp32 memory."""

    config_cls = LightningConfig

    def __init__(self, config: LightningConfig):
        super().__init__(config)
        c = config
        width = c.n_heads * c.dim
        self.qkvu_proj = nn.Linear(c.d_model, 4 * width, bias=c.bias)
        self.norm = nn.RMSNorm(width, eps=c.norm_eps, elementwise_affine=False)
        self.o_proj = nn.Linear(width, c.d_model, bias=c.bias)
        self.register_buffer(
            "log_decay", lightning_log_decay(c.n_heads, c.layer_idx, c.n_layers), persistent=False
        )

    def _forward(self, x, state, return_internals):
        c = self.config
        B, T, _ = x.shape
        H, D = c.n_heads, c.dim
        initial_state, start = self.carried(state)
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)  # (B, T, H*D) each
        q, k = F.silu(q).view(B, T, H, D), F.silu(k).view(B, T, H, D)
        v = v.view(B, T, H, D)
        o, final = lightning(
            q,
            k,
            v,
            self.log_decay,
            scale=1.0,  # TransNormerLLM does not scale q k^T
            initial_state=initial_state,
            output_final_state=True,
            chunk_size=c.chunk_size,
            backend=self.step_backend(x),
        )  # (B, T, H, D)
        gate = torch.sigmoid(u) if c.output_gate == "sigmoid" else u  # (B, T, H*D)
        y = self.o_proj(self.norm(o.reshape(B, T, H * D)) * gate)
        internals = {}
        if return_internals:
            internals["gate"] = gate.detach().view(B, T, H, D)
            internals["decay"] = self.log_decay.exp()  # lambda_h (H,)
            if state is None:  # the T x T operator of this call; with a carried state the past is not in it
                internals["attn"] = lightning_attention_matrix(
                    q.detach(), k.detach(), self.log_decay, scale=1.0
                )
        return y, RecurrentState(final, start + T), internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        """GPT-2 style init: N(0, std), the output projection scaled by 1/sqrt(2 * n_layers)."""
        gpt2_init((self.qkvu_proj,), self.o_proj, std, n_layers)


register(
    MechanismSpec(
        key="lightning",
        family="linear",
        config_cls=LightningConfig,
        module_cls=LightningAttention,
        op=lightning,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer (Qin et al., 2023)",
        notes="fixed decay exp(-2^(-8h/H)) per head (ALiBi slopes), swish q/k, SRMSNorm, output gate; no LRPE",
        extra={"test_options": {"chunk_size": 8}},
    )
)
