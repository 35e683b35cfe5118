"""OverLoCK's ContMix as a (B, H, W, C) mixer (OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels, CVPR 2025, arXiv 2502.20087; code github.com/LMMMEng/OverLoCK,
``segmentation/models/overlock.py``, ``DynamicConvBlock``).

    q = W_q x * scale (C/2 channels, heads),  k = W_k AvgPool_7(x) (C/2 channels, 49 region tokens)
    taps = softmax(W_p (q . k) + RPB)       per pixel and head: k_s^2 small-kernel and K^2 large-kernel taps
    o = [na2d_av(taps_s, x_0), na2d_av(taps_l, x_1)]    the two halves of the channels
    y = W_out(SiLU(W_g x) ⊙ SE(W_d o + LePE(x)))

The taps come from the affinity of each pixel's query with 49 pooled region keys, so the kernel at a pixel
mixes in the context of the whole map. The aggregation is gatelab.ops.contmix, on the windows of
gatelab.ops.neighborhood. Where this differs from the code, and why:
- the code's keys come from a separate context map (the Overview-Net's features, C_h channels); a mixer
  has one input, so the keys are pooled from the mixer input itself (self-context);
- the code's BatchNorms (after the query, key, gate, output and LePE convolutions) are left out: a token
  mixer here does not couple the samples of a batch; the block's fusion convs, residuals and ConvFFN
  are the backbone's;
- LePE is one K x K depthwise conv, the inference-time form of the code's re-parameterised dilated block.
Maps smaller than the large kernel are bilinearly upsampled for the aggregation and pooled back, as the
code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.contmix import BACKENDS, contmix
from gatelab.registry import MechanismSpec, register

from ._base import check_positive
from ._vision import VisionConfig, VisionMixer, channels_first, channels_last, conv_map


@dataclass
class ContMixConfig(VisionConfig):
    backends = BACKENDS
    kernel_size: int = 7  # the large dynamic kernel K (the code's stages use 7 to 17)
    small_kernel: int = 5  # the small dynamic kernel (the code's smk_size)
    pool_size: int = 7  # region keys: an AdaptiveAvgPool to pool_size x pool_size
    se: bool = True  # squeeze-and-excitation after the LePE sum, as the code

    def __post_init__(self):
        super().__post_init__()
        for name in ("kernel_size", "small_kernel", "pool_size"):
            check_positive(name, getattr(self, name))
        if self.d_model % (2 * self.n_heads):
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by 2 * n_heads ({2 * self.n_heads}): the channels "
                "split into a small-kernel and a large-kernel half of n_heads heads each"
            )
        if self.small_kernel > self.kernel_size:
            raise ValueError(
                f"small_kernel ({self.small_kernel}) must be <= kernel_size ({self.kernel_size})"
            )


class SqueezeExcite(nn.Module):
    """The code's SEModule: channel weights sigmoid(W_2 ReLU(W_1 mean_hw x)), reduction 4 (on (B, H, W, C))."""

    def __init__(self, C: int):
        super().__init__()
        self.reduce, self.expand = nn.Linear(C, max(C // 4, 1)), nn.Linear(max(C // 4, 1), C)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((1, 2), keepdim=True)))))


def relative_bias(rpb: torch.Tensor, H: int, W: int, K: int) -> torch.Tensor:
    """(H, W, G, K * K) bias of each tap from rpb (G, 2K-1, 2K-1) at its offset key - query, NATTEN's RPB."""
    rows = torch.arange(H, device=rpb.device)
    cols = torch.arange(W, device=rpb.device)
    dy = (
        (rows - K // 2).clamp(0, H - K)[:, None] + torch.arange(K, device=rpb.device) - rows[:, None]
    )  # (H, K)
    dx = (
        (cols - K // 2).clamp(0, W - K)[:, None] + torch.arange(K, device=rpb.device) - cols[:, None]
    )  # (W, K)
    bias = rpb[:, dy[:, None, :, None] + K - 1, dx[None, :, None, :] + K - 1]  # (G, H, W, K, K)
    return bias.permute(1, 2, 0, 3, 4).flatten(3)


class ContMix(VisionMixer):
    config_cls = ContMixConfig

    def __init__(self, config: ContMixConfig):
        super().__init__(config)
        C, G, K, k = config.d_model, config.n_heads, config.kernel_size, config.small_kernel
        self.query = nn.Linear(C, C // 2, bias=False)
        self.key = nn.Linear(C, C // 2, bias=False)
        self.weight_proj = nn.Linear(config.pool_size**2, k * k + K * K)
        self.rpb_small = nn.Parameter(torch.zeros(G, 2 * k - 1, 2 * k - 1))  # zero init, as the code
        self.rpb_large = nn.Parameter(torch.zeros(G, 2 * K - 1, 2 * K - 1))
        self.dyconv_proj = nn.Linear(C, C, bias=False)
        self.lepe = nn.Conv2d(C, C, K, padding=K // 2, groups=C)
        self.se = SqueezeExcite(C) if config.se else None
        self.gate = nn.Linear(C, C, bias=False)
        self.proj = nn.Linear(C, C)
        self.scale = (C // 2 // G) ** -0.5

    def taps(self, x):
        """Softmaxed (B, H, W, G, k^2) small and (B, H, W, G, K^2) large kernels of a map x (B, H, W, C)."""
        c = self.config
        B, H, W, C = x.shape
        G, k, K = c.n_heads, c.small_kernel, c.kernel_size
        q = (self.query(x) * self.scale).view(B, H, W, G, -1)  # (B, H, W, G, C/2G)
        pooled = channels_last(F.adaptive_avg_pool2d(channels_first(x), c.pool_size)).flatten(1, 2)
        key = self.key(pooled).view(B, c.pool_size**2, G, -1)  # (B, 49, G, C/2G)
        affinity = torch.einsum("bhwgc,blgc->bhwgl", q, key)  # (B, H, W, G, 49)
        small, large = self.weight_proj(affinity).split([k * k, K * K], dim=-1)
        small = torch.softmax(small + relative_bias(self.rpb_small, H, W, k), dim=-1)
        large = torch.softmax(large + relative_bias(self.rpb_large, H, W, K), dim=-1)
        return small, large

    def _forward(self, x, return_internals):
        c = self.config
        B, H, W, C = x.shape
        gate = F.silu(self.gate(x))
        lepe = conv_map(self.lepe, x)
        xs = x
        if min(H, W) < c.kernel_size:  # the code's upsampling: the short side becomes K, the aspect kept
            size = (
                (c.kernel_size, int(c.kernel_size / H * W))
                if H < W
                else (int(c.kernel_size / W * H), c.kernel_size)
            )
            xs = channels_last(
                F.interpolate(channels_first(x), size=size, mode="bilinear", align_corners=False)
            )
        small, large = self.taps(xs)
        values = xs.reshape(*xs.shape[:3], 2, c.n_heads, -1)  # (B, Hs, Ws, 2, G, C/2G): the two halves
        o = torch.cat(
            [
                contmix(small, values[..., 0, :, :], kernel_size=c.small_kernel, backend=c.backend),
                contmix(large, values[..., 1, :, :], kernel_size=c.kernel_size, backend=c.backend),
            ],
            dim=-2,
        ).flatten(3)  # (B, Hs, Ws, C)
        if xs is not x:
            o = channels_last(F.adaptive_avg_pool2d(channels_first(o), (H, W)))
        o = self.dyconv_proj(o) + lepe
        if self.se is not None:
            o = self.se(o)
        y = self.proj(gate * o)
        internals = {"gate": gate, "taps_small": small, "taps_large": large} if return_internals else {}
        return y, internals


register(
    MechanismSpec(
        key="contmix",
        family="vision",
        config_cls=ContMixConfig,
        module_cls=ContMix,
        op=contmix,
        backends=BACKENDS,
        causal=False,
        bidirectional=True,
        paper="OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels "
        "(CVPR 2025)",
        notes="(B, H, W, C) maps, any H, W; context keys pooled from the input itself; no BatchNorm",
        extra={"spatial_dims": 2, "test_options": {"kernel_size": 5, "small_kernel": 3}},
    )
)
