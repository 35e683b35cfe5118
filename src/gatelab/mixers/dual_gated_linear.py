"""HER-Seg's dual-gated linear attention as a (B, H, W, C) mixer (HER-Seg: Holistically Efficient
Segmentation for High-Resolution Medical Images, 2025; code github.com/xq141839/HER-Seg, ``SAM/LGViT.py``:
``LinearAttention`` and the mixing half of ``LGViTBlock``).

    v = W_d SiLU(W_u x)                    value gate: a bottleneck of ratio 0.25
    o = RoPE(phi q)(sum RoPE(phi k)^T v / N) / (phi q . mean phi k) + LePE(v)     phi = ELU + 1
    y = W_o(o ⊙ SiLU(W_a x))               output gate

The block's LayerNorm sits outside the mixer (the backbone's pre-norm), so the output gate reads the
mixer input. Where this follows the code rather than the paper: the paper's cascaded token filtering is
not in the code and is not here; the code builds RoPE for one fixed square map (``h = w = sqrt(N)``),
while this mixer builds it for whatever (H, W) map it is given (any H != W). As in the code, q and k come
from one linear layer with bias and v only from the value gate (no value projection of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.dual_gated_linear import BACKENDS, dual_gated_linear, dual_gated_linear_weights
from gatelab.registry import MechanismSpec, register

from ._vision import VisionConfig, VisionMixer, conv_map, gate_output


@dataclass
class DualGatedLinearConfig(VisionConfig):
    backends = BACKENDS
    value_ratio: float = 0.25  # width of the value gate's bottleneck, as a fraction of d_model
    rope: bool = True  # the 2D rotary embedding on the numerator
    rope_base: float = 10000.0
    lepe: bool = True  # 3x3 depthwise conv on the values, added to the output
    gate: bool = True  # the output gate SiLU(W_a x)
    eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        self.head_dim  # noqa: B018 - d_model must split into heads
        if not 0 < self.value_ratio or int(self.d_model * self.value_ratio) < 1:
            raise ValueError(
                f"value_ratio must be > 0 and leave int(d_model * value_ratio) >= 1, got {self.value_ratio!r}"
            )
        if self.rope and self.d_model % 4:
            raise ValueError(f"rope needs d_model divisible by 4 (pairs over two axes), got {self.d_model}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")


class DualGatedLinearAttention(VisionMixer):
    config_cls = DualGatedLinearConfig

    def __init__(self, config: DualGatedLinearConfig):
        super().__init__(config)
        C = config.d_model
        self.qk = nn.Linear(C, 2 * C)
        self.up_proj = nn.Linear(C, int(C * config.value_ratio))
        self.down_proj = nn.Linear(int(C * config.value_ratio), C)
        if config.lepe:
            self.lepe = nn.Conv2d(C, C, 3, padding=1, groups=C)
        if config.gate:
            self.act_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def _forward(self, x, return_internals):
        c = self.config
        B, H, W, C = x.shape
        q, k = self.qk(x).view(B, H, W, 2, c.n_heads, c.head_dim).unbind(3)  # (B, H, W, h, D) each
        v = self.down_proj(F.silu(self.up_proj(x)))  # (B, H, W, C)
        heads_v = v.view(B, H, W, c.n_heads, c.head_dim)
        options = dict(rope=c.rope, rope_base=c.rope_base, eps=c.eps)
        o = dual_gated_linear(q, k, heads_v, backend=c.backend, **options).reshape(B, H, W, C)
        if c.lepe:
            o = o + conv_map(self.lepe, v)
        internals = {}
        if c.gate:
            o = gate_output(o, F.silu(self.act_proj(x)), internals, return_internals)
        if return_internals:
            internals["attn"] = dual_gated_linear_weights(q, k, **options)  # (B, h, N, N)
        return self.out_proj(o), internals


register(
    MechanismSpec(
        key="dual_gated_linear",
        family="vision",
        config_cls=DualGatedLinearConfig,
        module_cls=DualGatedLinearAttention,
        op=dual_gated_linear,
        backends=BACKENDS,
        causal=False,
        bidirectional=True,
        paper="HER-Seg: Holistically Efficient Segmentation for High-Resolution Medical Images (2025)",
        notes="(B, H, W, C) maps, any H, W; value gate + output gate, ELU+1 features, 2D RoPE, LePE; "
        "cascaded token filtering (paper only) left out",
        extra={"spatial_dims": 2},
    )
)
