"""BiFormer's region routing: region-level affinity from mean-pooled q and k, top-k regions per region.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023), section 3.2.
"""

from __future__ import annotations

import torch


def region_grid(height: int, width: int, regions) -> tuple[int, int]:
    """(Sh, Sw): the region grid; ``regions`` is an int (S x S) or a pair. Each must divide the map side."""
    rh, rw = (regions, regions) if isinstance(regions, int) else tuple(regions)
    for name, side, n in (("height", height, rh), ("width", width, rw)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"regions must be a positive int or a pair of them, got {regions!r}")
        if side % n:
            raise ValueError(
                f"the map {name} ({side}) must be divisible by the number of regions along it ({n})"
            )
    return rh, rw


def to_regions(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, Hh, Ww, *rest) -> (B, Sh * Sw, Hh/Sh * Ww/Sw, *rest): tokens grouped by region, region-major."""
    B, Hh, Ww = x.shape[:3]
    rest = x.shape[3:]
    sh, sw = grid
    x = x.reshape(B, sh, Hh // sh, sw, Ww // sw, *rest).transpose(2, 3)  # (B, sh, sw, h, w, *rest)
    return x.reshape(B, sh * sw, (Hh // sh) * (Ww // sw), *rest)


def from_regions(x: torch.Tensor, grid: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_regions`: (B, Sh * Sw, h * w, *rest) -> (B, Hh, Ww, *rest)."""
    B = x.shape[0]
    rest = x.shape[3:]
    sh, sw = grid
    x = x.reshape(B, sh, sw, height // sh, width // sw, *rest).transpose(2, 3)  # (B, sh, h, sw, w, *rest)
    return x.reshape(B, height, width, *rest)


@torch.no_grad()
def route(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], topk: int) -> torch.Tensor:
    """Top-k key regions per query region, shared by all heads (as the official routing on all channels).

    q (B, Hh, Ww, H, D), k (B, Hh, Ww, H, D) -> (B, R, topk) int64 region indices, R = Sh * Sw.
    The routing is not differentiated (the paper's default: gradients reach q and k through the tokens).
    """
    B, channels = q.shape[0], q.shape[3] * q.shape[4]  # explicit H*D: reshape cannot infer -1 when B = 0
    q_region = to_regions(q.float(), grid).mean(dim=2).reshape(B, grid[0] * grid[1], channels)  # (B, R, H*D)
    k_region = to_regions(k.float(), grid).mean(dim=2).reshape(B, grid[0] * grid[1], channels)
    affinity = q_region @ k_region.transpose(1, 2)  # (B, R, R) region-to-region adjacency
    return affinity.topk(topk, dim=-1).indices


def routed_regions(index: torch.Tensor, n_regions: int) -> torch.Tensor:
    """(B, R, topk) indices -> (B, R, R) bool: query region r may see key region s."""
    out = torch.zeros(*index.shape[:2], n_regions, dtype=torch.bool, device=index.device)
    return out.scatter_(-1, index, True)
