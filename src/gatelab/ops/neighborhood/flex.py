"""Neighborhood attention through FlexAttention: a mask_mod per dimension, block masks cached per shape, and
2D/3D maps reordered tile-major so that one block is one compact tile and a neighbourhood spans few blocks."""

from __future__ import annotations

import torch

from gatelab.ops.common.flex import (
    BLOCK_SIZE,
    cached_block_mask,
    from_tile_major,
    pick_tile,
    run_flex,
    to_tile_major,
    token_coords,
)

from .masks import visible_1d


def make_mask_mod(spatial, kernel_size, stride, dilation, causal, tile):
    """mask_mod(b, h, q_idx, kv_idx) over tokens in row-major (tile None) or tile-major order; key indices
    at or past N = prod(spatial) are the additional global keys, visible to every query."""
    N = 1
    for size in spatial:
        N *= size

    def mask_mod(b, h, q_idx, kv_idx):
        is_extra = kv_idx >= N
        kv_map = torch.where(is_extra, 0, kv_idx)
        q_crd = token_coords(q_idx, spatial, tile)
        kv_crd = token_coords(kv_map, spatial, tile)
        visible = None
        for i in range(len(spatial)):
            m = visible_1d(q_crd[i], kv_crd[i], spatial[i], kernel_size[i], stride[i], dilation[i], causal[i])
            visible = m if visible is None else visible & m
        return visible | is_extra

    return mask_mod


def neighborhood_block_mask(
    spatial, kernel_size, stride, dilation, causal, n_extra, device, block_size, tile
):
    N = 1
    for size in spatial:
        N *= size
    key = ("neighborhood", spatial, kernel_size, stride, dilation, causal, n_extra, tile)
    return cached_block_mask(
        key,
        lambda: make_mask_mod(spatial, kernel_size, stride, dilation, causal, tile),
        N,
        N + n_extra,
        device,
        block_size,
    )


def neighborhood_flex(
    q,
    k,
    v,
    *,
    spatial,
    kernel_size,
    stride,
    dilation,
    causal,
    scale,
    extra_k=None,
    extra_v=None,
    block_size: int = BLOCK_SIZE,
    tile_major: bool = True,
    compile: bool | None = None,
):
    """q (B, *spatial, H, D), k (B, *spatial, Hkv, D), v (B, *spatial, Hkv, V); extra_k/extra_v
    (B, X, Hkv, D/V) or None. Returns (B, *spatial, H, V)."""
    tile = pick_tile(spatial, block_size) if tile_major and len(spatial) > 1 else None
    if tile is not None:
        qf, kf, vf = (to_tile_major(t, spatial, tile) for t in (q, k, v))  # (B, N, H, D)
    else:
        qf, kf, vf = (t.flatten(1, len(spatial)) for t in (q, k, v))
    n_extra = 0 if extra_k is None else extra_k.shape[1]
    if n_extra:
        kf, vf = torch.cat([kf, extra_k], dim=1), torch.cat([vf, extra_v], dim=1)  # (B, N + X, Hkv, D)
    block_mask = neighborhood_block_mask(
        tuple(spatial), kernel_size, stride, dilation, causal, n_extra, q.device, block_size, tile
    )
    o = run_flex(qf, kf, vf, block_mask, scale=scale, compile=compile)  # (B, N, H, V)
    if tile is not None:
        return from_tile_major(o, spatial, tile)
    return o.reshape(q.shape[0], *spatial, *o.shape[2:])
