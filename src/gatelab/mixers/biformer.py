"""Bi-level routing attention as a vision mixer on (B, H, W, C) maps: BiFormer: Vision Transformer with
Bi-Level Routing Attention (Zhu et al., 2023).

qkv projection, region routing (top-k regions by the affinity of mean-pooled q and k), token attention over
the routed regions, plus the local context enhancement LCE(v) (a depthwise convolution of v, eq. 6), then
the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.biformer import BACKENDS, biformer, route
from gatelab.ops.biformer.reference import biformer_reference
from gatelab.ops.biformer.routing import region_grid
from gatelab.registry import MechanismSpec, register

from ._base import Mixer, MixerConfig, check_input, check_positive


@dataclass
class BiformerConfig(MixerConfig):
    causal: bool = False  # a vision mixer: every token may be routed anywhere on the map
    regions: int | tuple[int, int] = 7  # regions per side (the paper's S), or (along height, along width)
    topk: int = 4  # routed regions per query region
    lce_kernel: int = 5  # depthwise conv kernel of the local context enhancement on v; 0 turns it off
    bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.causal:
            raise ValueError("biformer is a bidirectional vision mixer; build it with causal=False")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        pair = (self.regions, self.regions) if isinstance(self.regions, int) else tuple(self.regions)
        if len(pair) != 2:
            raise ValueError(f"regions must be an int or a pair of ints, got {self.regions!r}")
        for n in pair:
            check_positive("regions", n)
        check_positive("topk", self.topk)
        if self.topk > pair[0] * pair[1]:
            raise ValueError(
                f"topk ({self.topk}) must be at most the number of regions ({pair[0] * pair[1]})"
            )
        if (
            not isinstance(self.lce_kernel, int)
            or self.lce_kernel < 0
            or (self.lce_kernel and self.lce_kernel % 2 == 0)
        ):
            raise ValueError(f"lce_kernel must be 0 (off) or an odd positive int, got {self.lce_kernel!r}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {self.backend!r}")


class BiformerAttention(Mixer):
    """y = mixer(x) for x (B, H, W, d_model); no state (bidirectional)."""

    config_cls = BiformerConfig

    def __init__(self, config: BiformerConfig):
        super().__init__(config)
        c = config
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.lce = None
        if c.lce_kernel:
            k = c.lce_kernel
            self.lce = nn.Conv2d(c.d_model, c.d_model, k, padding=k // 2, groups=c.d_model)

    def forward(self, x: torch.Tensor, state=None, *, return_internals: bool = False):
        c = self.config
        check_input(x, c.d_model, 2, "(B, H, W, d_model)")
        if state is not None:
            raise ValueError(
                "a state (decoding) needs a causal mixer; biformer is bidirectional: pass state=None"
            )
        region_grid(x.shape[1], x.shape[2], c.regions)  # clear error before any work
        B, Hh, Ww, C = x.shape
        H = c.n_heads
        q, k, v = self.qkv(x).view(B, Hh, Ww, 3, H, C // H).unbind(dim=3)  # (B, Hh, Ww, H, D) each
        o = biformer(q, k, v, regions=c.regions, topk=c.topk, backend=c.backend).reshape(B, Hh, Ww, C)
        if self.lce is not None:
            o = o + self.lce(v.reshape(B, Hh, Ww, C).permute(0, 3, 1, 2)).permute(
                0, 2, 3, 1
            )  # (B, Hh, Ww, C)
        y = self.o_proj(o)
        if not return_internals:
            return y, None
        grid = region_grid(Hh, Ww, c.regions)
        _, probs = biformer_reference(
            q, k, v, grid=grid, topk=c.topk, scale=(C // H) ** -0.5, return_probs=True
        )
        return y, None, {"attn": probs, "routing": route(q, k, grid, c.topk)}

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * n_layers))
        for lin in (self.qkv, self.o_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


register(
    MechanismSpec(
        key="biformer",
        family="sparse",
        config_cls=BiformerConfig,
        module_cls=BiformerAttention,
        op=biformer,
        backends=BACKENDS,
        causal=False,
        bidirectional=True,
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023)",
        notes="vision mixer on (B, H, W, C) maps; LCE = depthwise conv on v",
        extra={
            "spatial_dims": 2,
            "test_spatial_shape": (6, 8),
            "test_options": {"regions": 2, "topk": 2, "lce_kernel": 3},
        },
    )
)
