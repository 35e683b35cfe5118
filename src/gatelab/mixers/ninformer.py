"""NiNformer's mixer gating unit as a (B, H, W, C) mixer (NiNformer: A Network in Network Transformer with
Token Mixing Generated Gating Function, 2024; code github.com/Abdullah-88/NiNformer).

    y = (W x) ⊙ M(x),   M(x) = m + ChannelMLP(LN2 m),   m = x + TokenMLP(LN1 x)

TokenMLP runs along the N = H * W tokens of the map (N -> token_dim -> N, GELU), ChannelMLP along the
channels (C -> hidden_dim -> C, GELU): the gate is an MLP-Mixer block. The token MLP has N inputs, so a
mixer is built for one map size (``map_size``) and refuses any other; it sees the whole map (bidirectional).
As the code's ``NiNBlock``, token_dim defaults to the channel MLP's hidden width; dropout is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.registry import MechanismSpec, register

from ._base import check_positive
from ._vision import VisionConfig, VisionMixer


@dataclass
class NiNformerConfig(VisionConfig):
    backends = ("reference", "torch")
    map_size: tuple[int, int] | None = None  # (H, W) of the maps: required, the token MLP has H * W inputs
    hidden_dim: int | None = None  # channel MLP width; None: 4 * d_model (the code's d_ffn)
    token_dim: int | None = None  # token MLP width; None: hidden_dim, as the code's NiNBlock

    def __post_init__(self):
        super().__post_init__()
        if self.map_size is None:
            raise ValueError("map_size (H, W) is required: the token MLP has H * W inputs, fixed when built")
        if len(self.map_size) != 2 or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.map_size
        ):
            raise ValueError(f"map_size must be two positive ints (H, W), got {self.map_size!r}")
        self.map_size = tuple(self.map_size)
        check_positive("hidden_dim", self.hidden_dim, allow_none=True)
        check_positive("token_dim", self.token_dim, allow_none=True)

    @property
    def tokens(self) -> int:
        return self.map_size[0] * self.map_size[1]

    @property
    def hidden(self) -> int:
        return self.hidden_dim or 4 * self.d_model

    @property
    def token_hidden(self) -> int:
        return self.token_dim or self.hidden


def _mlp(x, w1, b1, w2, b2):
    return F.gelu(x @ w1.T + b1) @ w2.T + b2


def ninformer_reference(x, params: dict[str, torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """The definition in fp32 on x (B, H, W, C), the token MLP written along an explicit token axis.

    params: proj_w (C, C), proj_b; ln1_w, ln1_b, ln2_w, ln2_b (C,); token_w1 (Dt, N), token_b1, token_w2
    (N, Dt), token_b2; channel_w1 (F, C), channel_b1, channel_w2 (C, F), channel_b2.
    """
    p = {k: v.float() for k, v in params.items()}
    B, H, W, C = x.shape
    x = x.float().reshape(B, H * W, C)  # (B, N, C)
    ln = lambda h, w, b: F.layer_norm(h, (C,), w, b, eps)  # noqa: E731
    tokens_along_last = ln(x, p["ln1_w"], p["ln1_b"]).transpose(1, 2)  # (B, C, N): mix along the tokens
    m = x + _mlp(tokens_along_last, p["token_w1"], p["token_b1"], p["token_w2"], p["token_b2"]).transpose(
        1, 2
    )
    m = m + _mlp(
        ln(m, p["ln2_w"], p["ln2_b"]), p["channel_w1"], p["channel_b1"], p["channel_w2"], p["channel_b2"]
    )
    y = (x @ p["proj_w"].T + p["proj_b"]) * m  # (B, N, C)
    return y.reshape(B, H, W, C)


class NiNformer(VisionMixer):
    config_cls = NiNformerConfig

    def __init__(self, config: NiNformerConfig):
        super().__init__(config)
        C, N = config.d_model, config.tokens
        self.proj = nn.Linear(C, C)
        self.token_norm = nn.LayerNorm(C)
        self.token_mlp = nn.Sequential(
            nn.Linear(N, config.token_hidden), nn.GELU(), nn.Linear(config.token_hidden, N)
        )
        self.channel_norm = nn.LayerNorm(C)
        self.channel_mlp = nn.Sequential(nn.Linear(C, config.hidden), nn.GELU(), nn.Linear(config.hidden, C))

    def params(self) -> dict[str, torch.Tensor]:
        """The weights under the names of :func:`ninformer_reference`."""
        t, c = self.token_mlp, self.channel_mlp
        return {
            "proj_w": self.proj.weight, "proj_b": self.proj.bias,
            "ln1_w": self.token_norm.weight, "ln1_b": self.token_norm.bias,
            "ln2_w": self.channel_norm.weight, "ln2_b": self.channel_norm.bias,
            "token_w1": t[0].weight, "token_b1": t[0].bias, "token_w2": t[2].weight, "token_b2": t[2].bias,
            "channel_w1": c[0].weight, "channel_b1": c[0].bias, "channel_w2": c[2].weight, "channel_b2": c[2].bias,
        }  # fmt: skip

    def _forward(self, x, return_internals):
        c = self.config
        B, H, W, C = x.shape
        if (H, W) != c.map_size:
            raise ValueError(
                f"{self.mechanism}: this mixer was built for {c.map_size[0]} x {c.map_size[1]} maps (its token MLP "
                f"has H * W = {c.tokens} inputs), got a {H} x {W} map; build one with map_size=({H}, {W})"
            )
        if c.resolved_backend == "reference":
            return ninformer_reference(x, self.params(), self.token_norm.eps).to(x.dtype), {}
        flat = x.reshape(B, H * W, C)  # (B, N, C)
        m = flat + self.token_mlp(self.token_norm(flat).transpose(1, 2)).transpose(1, 2)
        m = m + self.channel_mlp(self.channel_norm(m))
        return (self.proj(flat) * m).reshape(B, H, W, C), {}


register(
    MechanismSpec(
        key="ninformer",
        family="vision",
        config_cls=NiNformerConfig,
        module_cls=NiNformer,
        backends=NiNformerConfig.backends,
        causal=False,
        bidirectional=True,
        paper="NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function (2024)",
        notes="(B, H, W, C) maps of one size fixed when built (map_size); gate = an MLP-Mixer block",
        extra={"spatial_dims": 2, "test_options": {"map_size": (6, 7)}, "test_spatial_shape": (6, 7)},
    )
)
