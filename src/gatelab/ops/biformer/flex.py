"""Bi-level routing attention through FlexAttention: tokens in region-major order (each region contiguous),
a BlockMask of the routed regions (from_kv_blocks) and a mask_mod that looks the routing up."""

from __future__ import annotations

from gatelab.ops.common.flex import check_flex_inputs
from gatelab.ops.common.flex_blocks import block_mask_from_rows, run_flex

from .routing import from_regions, route, routed_regions, to_regions


def biformer_flex(q, k, v, *, grid, topk, scale, compiled=None):
    """q (B, Hh, Ww, H, D), k (B, Hh, Ww, H, D), v (B, Hh, Ww, H, V) -> (B, Hh, Ww, H, V)."""
    check_flex_inputs("biformer", q, k, v)
    B, Hh, Ww = q.shape[:3]
    qr, kr, vr = (to_regions(x, grid).flatten(1, 2) for x in (q, k, v))  # (B, N, H, *) region-major
    block_mask = biformer_block_mask(q, k, grid=grid, topk=topk)
    o = run_flex(qr, kr, vr, block_mask, scale, compiled=compiled)  # (B, N, H, V)
    n = (Hh // grid[0]) * (Ww // grid[1])
    return from_regions(o.unflatten(1, (grid[0] * grid[1], n)), grid, Hh, Ww)


def biformer_block_mask(q, k, *, grid, topk):
    """The BlockMask (with its mask_mod) of the routed regions, tokens in region-major order."""
    Hh, Ww = q.shape[1:3]
    routed = routed_regions(route(q, k, grid, topk), grid[0] * grid[1])  # (B, R, R)
    n = (Hh // grid[0]) * (Ww // grid[1])
    N = Hh * Ww

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // n, kv_idx // n]

    rows = routed.repeat_interleave(n, dim=-1)[:, None]  # (B, 1, R, N)
    # Region-sized flex blocks (when a region holds enough tokens for a kernel tile) visit exactly the
    # routed regions; 128-token blocks would straddle regions and visit up to 4x more pairs.
    block = n if n % 16 == 0 and 32 <= n <= 128 else 128
    return block_mask_from_rows(rows, n, N, N, mask_mod, block=block)
