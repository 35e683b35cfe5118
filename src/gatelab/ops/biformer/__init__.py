"""Bi-Level Routing Attention: BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023)."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_head_dims, check_heads, check_same, check_scale, check_tensor
from gatelab.ops.common.flex_blocks import routed_backend

from .flex import biformer_flex
from .reference import biformer_reference
from .routing import region_grid, route, routed_regions

BACKENDS = ("reference", "flex")


def biformer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    regions=7,
    topk: int = 4,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-level routing attention on a 2D map: the map is cut into a regions x regions grid; each query
    region keeps the ``topk`` key regions with the largest affinity between mean-pooled q and k (summed over
    heads); each token then attends to every token of its routed regions. The local context enhancement
    (a depthwise convolution of v) has parameters and lives in the mixer.

    Args:
        q: (B, Hh, Ww, H, D) queries on an Hh x Ww map.
        k: (B, Hh, Ww, H, D) keys.
        v: (B, Hh, Ww, H, V) values.
        regions: regions per side (int) or (along height, along width); each must divide its side.
        topk: routed regions per query region, 1 <= topk <= number of regions; all of them is full attention.
        scale: score scale, default D ** -0.5.
        backend: "reference" (fp32 gather + softmax, autograd), "flex" (FlexAttention; no backward on CPU)
            or "auto" (flex on CUDA, reference on CPU, where flex has no backward).
    Returns:
        o: (B, Hh, Ww, H, V) in q's dtype.
    """
    layout = "(B, Hh, Ww, H, D)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 5, layout)
    check_same("q", q, k=k, v=v)
    if k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(
            f"q and k must have the same shape and v the same (B, Hh, Ww, H), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_heads(q.shape[3])
    check_head_dims(q, v)
    check_scale(scale)
    grid = region_grid(q.shape[1], q.shape[2], regions)
    n_regions = grid[0] * grid[1]
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n_regions:
        raise ValueError(f"topk must be an int in [1, {n_regions}] (the number of regions), got {topk!r}")
    name = routed_backend("biformer", backend, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = biformer_reference if name == "reference" else biformer_flex
    return fn(q, k, v, grid=grid, topk=topk, scale=scale)


__all__ = ["biformer", "biformer_reference", "region_grid", "route", "routed_regions", "BACKENDS"]
