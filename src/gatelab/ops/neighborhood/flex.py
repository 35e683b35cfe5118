"""Neighborhood attention through FlexAttention: a mask_mod per dimension, block masks cached per shape, and
2D/3D maps reordered tile-major so that one block is one compact tile and a neighbourhood spans few blocks."""

from __future__ import annotations

import torch

from gatelab.ops.common.flex import (
    BLOCK_SIZE,
    block_density,
    cached_block_mask,
    from_tile_major,
    pick_tile,
    run_flex,
    to_tile_major,
    token_coords,
)

from .masks import visible_1d


def make_mask_mod(spatial, kernel_size, stride, dilation, causal, tile, n_extra: int = 0):
    """mask_mod(b, h, q_idx, kv_idx) over tokens in row-major (tile None) or tile-major order; key indices
    at or past N = prod(spatial) are the additional global keys, visible to every query."""
    N = 1
    for size in spatial:
        N *= size

    def local(q_idx, kv_idx):
        q_crd = token_coords(q_idx, spatial, tile)
        kv_crd = token_coords(kv_idx, spatial, tile)
        visible = None
        for i in range(len(spatial)):
            m = visible_1d(q_crd[i], kv_crd[i], spatial[i], kernel_size[i], stride[i], dilation[i], causal[i])
            visible = m if visible is None else visible & m
        return visible

    def mask_mod(b, h, q_idx, kv_idx):
        return local(q_idx, kv_idx)

    def mask_mod_with_extra(b, h, q_idx, kv_idx):
        is_extra = kv_idx >= N
        return local(q_idx, torch.where(is_extra, 0, kv_idx)) | is_extra

    return mask_mod_with_extra if n_extra else mask_mod


def neighborhood_block_mask(
    spatial, kernel_size, stride, dilation, causal, n_extra, device, block_size, tile
):
    N = 1
    for size in spatial:
        N *= size
    key = ("neighborhood", spatial, kernel_size, stride, dilation, causal, n_extra, tile)
    return cached_block_mask(
        key,
        lambda: make_mask_mod(spatial, kernel_size, stride, dilation, causal, tile, n_extra),
        N,
        N + n_extra,
        device,
        block_size,
    )


def choose_tile(spatial, kernel_size, stride, dilation, causal, device, block_size, tile_major):
    """The tile of the token order flex runs in, or None for row-major. Tile-major order keeps a 2D/3D
    neighbourhood inside few blocks, but costs two permutations and a dearer mask_mod; on a narrow map
    row-major blocks already span whole rows, so "auto" (None) keeps the order with fewer visited blocks."""
    if tile_major is False or len(spatial) == 1:
        return None
    tile = pick_tile(spatial, block_size)
    if tile is None or tile_major:
        return tile
    key = (spatial, kernel_size, stride, dilation, causal, str(device), block_size)
    if key not in _TILE_CHOICE:
        args = (spatial, kernel_size, stride, dilation, causal, 0, device, block_size)
        row_major = block_density(neighborhood_block_mask(*args, None))
        tiled = block_density(neighborhood_block_mask(*args, tile))
        _TILE_CHOICE[key] = tile if tiled < 0.9 * row_major else None  # a clear win pays for the permutations
    return _TILE_CHOICE[key]


_TILE_CHOICE: dict = {}


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
    tile_major: bool | None = None,
    compile: bool | None = None,
):
    """q (B, *spatial, H, D), k (B, *spatial, Hkv, D), v (B, *spatial, Hkv, V); extra_k/extra_v
    (B, X, Hkv, D/V) or None. Returns (B, *spatial, H, V).

    tile_major: True reorders a 2D/3D map into tiles of ``block_size`` tokens (when a tile divides the map),
    False keeps row-major order, None picks the order whose block mask visits fewer blocks.
    """
    tile = choose_tile(
        tuple(spatial), kernel_size, stride, dilation, causal, q.device, block_size, tile_major
    )
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
