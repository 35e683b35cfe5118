"""FlexAttention helpers shared by the sparse ops (FlexAttention, Dong et al., 2024): block masks cached
per shape, data-dependent block masks from routed key blocks, one runner (compiled where it helps),
tile-major token orders for 2D/3D maps, and block/ideal density for the benchmarks.

What torch 2.13's flex_attention does on CPU (measured on the dev CPU):
- eager forward works (it materialises the full score matrix and applies only ``mask_mod``: block
  indices are ignored, so every mask_mod must agree with its blocks);
- compiled forward works (C++ template kernel; checked: fp32 and bf16, head dims 60/48 and V != D, GQA,
  lengths that are not a multiple of the block size, a single decoding query against a longer cache);
  the first call per shape and mask compiles for 15-40 s on the 2-core dev CPU;
- on CPU the mask_mod is evaluated for every score of every partial block and dominates the compiled
  time: keep mask_mods to a few integer ops (shifts for power-of-two sizes, no div/mod when not needed);
- there is no backward on CPU, eager or compiled ("FlexAttention does not support backward on CPU"):
  training on CPU goes through the reference/SDPA paths, which the ops pick explicitly.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BLOCK_SIZE = 128  # FlexAttention's default sparse block (queries x keys)
COMPILE_MIN_SCORES = 1 << 20  # on CPU, compile once Tq * S reaches this many scores per (batch, head)
_CACHE_SIZE = 64


def flex_supported() -> bool:
    """True when this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def flex_usable(*tensors: torch.Tensor | None) -> bool:
    """Whether flex can run these inputs: FlexAttention exists, and no backward is needed on CPU."""
    if not flex_supported():
        return False
    ref = next(t for t in tensors if t is not None)
    return ref.is_cuda or not needs_grad(*tensors)


def check_flex_inputs(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error when flex cannot run (no FlexAttention, or a CPU backward was asked for)."""
    if not flex_supported():
        raise RuntimeError(
            f"{op}: backend 'flex' needs torch >= 2.5 (FlexAttention); use 'reference' or 'sdpa'"
        )
    ref = next(t for t in tensors if t is not None)
    if not ref.is_cuda and needs_grad(*tensors):
        raise RuntimeError(
            f"{op}: backend 'flex' has no backward on CPU (FlexAttention does not support it) but the inputs "
            f"require grad; train on CPU with backend='reference' (or 'sdpa'), or run under torch.no_grad()"
        )


# Block masks ----------------------------------------------------------------------------------------

_BLOCK_MASKS: OrderedDict[Hashable, object] = OrderedDict()


def cached_block_mask(
    key: Hashable,
    make_mask_mod: Callable[[], MaskMod],
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str,
    block_size: int | tuple[int, int] = BLOCK_SIZE,
):
    """The BlockMask of a mask that depends only on shapes and options, built once per
    (key, Q_LEN, KV_LEN, device, block_size) and kept in a small LRU cache.

    key: hashable description of the mask (op name and every option the mask_mod closes over).
    make_mask_mod: builds the mask_mod(b, h, q_idx, kv_idx) -> bool; called only on a cache miss.
    The mask is the same for every batch entry and head (B = H = None, broadcast by flex).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    full_key = (key, int(Q_LEN), int(KV_LEN), str(torch.device(device)), block_size)
    hit = _BLOCK_MASKS.get(full_key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(full_key)
        return hit
    block_mask = create_block_mask(
        make_mask_mod(), None, None, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=block_size
    )
    _BLOCK_MASKS[full_key] = block_mask
    if len(_BLOCK_MASKS) > _CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


def clear_block_mask_cache() -> None:
    _BLOCK_MASKS.clear()


def block_mask_from_routing(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    mask_mod: MaskMod,
    Q_LEN: int,
    KV_LEN: int,
    block_size: int | tuple[int, int] = BLOCK_SIZE,
):
    """A BlockMask for data-dependent routing (BiFormer, HiP, PSA): which key blocks each query block reads.

    kv_num_blocks: (B, H, n_q_blocks) int32, how many key blocks each query block reads.
    kv_indices: (B, H, n_q_blocks, n_kv_blocks) int32, their indices (first kv_num_blocks entries used).
    mask_mod: must allow exactly the (query, key) pairs inside the routed blocks (and any finer mask):
        eager flex ignores the block indices and applies only mask_mod, so the two must agree.
    Every routed block is treated as partial (mask_mod is evaluated inside it), never skipped silently.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if kv_num_blocks.ndim != 3 or kv_indices.ndim != 4:
        raise ValueError(
            f"kv_num_blocks must be (B, H, n_q_blocks) and kv_indices (B, H, n_q_blocks, n_kv_blocks), "
            f"got {tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}"
        )
    return BlockMask.from_kv_blocks(
        kv_num_blocks.to(torch.int32),
        kv_indices.to(torch.int32),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(Q_LEN, KV_LEN),
    )


def block_density(block_mask) -> float:
    """Fraction of (query block, key block) pairs the kernel visits (partial + full blocks)."""
    Q_LEN, KV_LEN = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_q, n_kv = -(-Q_LEN // q_block), -(-KV_LEN // kv_block)
    visited = block_mask.kv_num_blocks[..., :n_q].sum()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks[..., :n_q].sum()
    pairs = block_mask.kv_num_blocks[..., :n_q].numel() * n_kv
    return float(visited) / pairs


def ideal_density(mask: torch.Tensor) -> float:
    """Fraction of (query, key) pairs a dense bool mask (..., Tq, S) allows: the FLOPs a perfect kernel does."""
    return float(mask.float().mean())


# Running flex -----------------------------------------------------------------------------------------

_COMPILED: dict[str, Callable] = {}


def default_compile(q: torch.Tensor, S: int) -> bool:
    """Compile on GPU, and on CPU once the problem is large enough to repay tens of seconds of compilation;
    GATELAB_FLEX_COMPILE=0/1 forces the choice."""
    forced = os.environ.get("GATELAB_FLEX_COMPILE")
    if forced in ("0", "1"):
        return forced == "1"
    return q.is_cuda or q.shape[1] * S >= COMPILE_MIN_SCORES


def _flex_fn(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _COMPILED:
        # every block mask brings its own mask_mod closure, hence its own graph: with dynamo's default
        # limit of 8 graphs per function, a ninth mask would silently run eager flex (dense scores)
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 512)
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def run_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    *,
    scale: float | None = None,
    score_mod=None,
    compile: bool | None = None,
) -> torch.Tensor:
    """flex_attention in the (B, T, H, D) layout.

    q: (B, Tq, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, V); H a multiple of Hkv (GQA).
    block_mask: from :func:`cached_block_mask` / :func:`block_mask_from_routing`, or None (dense).
    compile: None picks :func:`default_compile`. Returns o (B, Tq, H, V) in q's dtype.
    """
    import warnings

    compiled = default_compile(q, k.shape[1]) if compile is None else compile
    fn = _flex_fn(compiled)
    with warnings.catch_warnings():
        # eager flex warns that it materialises the scores; that is what eager means here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        o = fn(
            q.transpose(1, 2),  # (B, H, Tq, D)
            k.transpose(1, 2),
            v.transpose(1, 2),
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
    return o.transpose(1, 2)  # (B, Tq, H, V)


# Tile-major token orders --------------------------------------------------------------------------------


def pick_tile(spatial: Sequence[int], block_size: int = BLOCK_SIZE) -> tuple[int, ...] | None:
    """A tile (one size per dim) with prod(tile) == block_size that divides ``spatial``, as square as
    possible, so that one flex block is one compact tile of the map; None when no such tile exists."""
    best, best_score = None, None
    n = len(spatial)

    def candidates(dim: int, remaining: int):
        if dim == n - 1:
            if spatial[dim] % remaining == 0 and remaining <= spatial[dim]:
                yield (remaining,)
            return
        t = 1
        while t <= min(remaining, spatial[dim]):
            if remaining % t == 0 and spatial[dim] % t == 0:
                for rest in candidates(dim + 1, remaining // t):
                    yield (t, *rest)
            t *= 2

    for tile in candidates(0, block_size):
        score = max(tile) / min(tile)  # squareness: a compact tile keeps neighbourhoods inside few blocks
        if best_score is None or score < best_score:
            best, best_score = tile, score
    return best


@functools.lru_cache(maxsize=32)
def _tile_order(
    spatial: tuple[int, ...], tile: tuple[int, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): order[i] is the row-major index of the i-th token in tile-major order."""
    n = len(spatial)
    grid = [s // t for s, t in zip(spatial, tile)]
    split = []
    for g, t in zip(grid, tile):
        split += [g, t]
    index = torch.arange(math.prod(spatial), device=device).view(*split)  # (g0, t0, g1, t1, ...)
    order = index.permute([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)]).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return order, inverse


def _check_tile(spatial: Sequence[int], tile: Sequence[int]) -> None:
    if len(tile) != len(spatial) or any(s % t for s, t in zip(spatial, tile)):
        raise ValueError(
            f"every spatial size must be a multiple of its tile size, got {tuple(spatial)} and {tuple(tile)}"
        )


def to_tile_major(x: torch.Tensor, spatial: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """(B, *spatial, ...) -> (B, N, ...) with the tokens of each tile contiguous (tiles in row-major order,
    row-major inside a tile). Every spatial size must be a multiple of its tile size.

    A gather with a cached index (index_select, differentiable): on the dev CPU it copied a (1, 64, 64, 4, 64)
    map in 0.6 ms where reshape-permute-copy took 27 ms."""
    _check_tile(spatial, tile)
    order, _ = _tile_order(tuple(spatial), tuple(tile), str(x.device))
    return x.flatten(1, len(spatial)).index_select(1, order)


def from_tile_major(y: torch.Tensor, spatial: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_tile_major`: (B, N, ...) -> (B, *spatial, ...)."""
    _check_tile(spatial, tile)
    _, inverse = _tile_order(tuple(spatial), tuple(tile), str(y.device))
    return y.index_select(1, inverse).reshape(y.shape[0], *spatial, *y.shape[2:])


def token_coords(
    idx: torch.Tensor, spatial: Sequence[int], tile: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Map coordinates of flat token indices: row-major when ``tile`` is None, else tile-major.
    Integer arithmetic only, so it works inside a mask_mod (eager, vmapped or compiled)."""
    n = len(spatial)
    if tile is None:
        coords = []
        for size in reversed(spatial):
            if size & (size - 1) == 0:  # a power of two: shifts and masks, much cheaper in a flex kernel
                coords.append(idx & (size - 1))
                idx = idx >> (size.bit_length() - 1)
            else:
                coords.append(idx % size)
                idx = idx // size
        return tuple(reversed(coords))
    tile_volume = math.prod(tile)
    grid = [s // t for s, t in zip(spatial, tile)]
    if tile_volume & (tile_volume - 1) == 0:
        inner, outer = idx & (tile_volume - 1), idx >> (tile_volume.bit_length() - 1)
    else:
        inner, outer = idx % tile_volume, idx // tile_volume
    tile_coords = token_coords(outer, grid)
    inner_coords = token_coords(inner, tile)
    return tuple(tile_coords[i] * tile[i] + inner_coords[i] for i in range(n))


__all__ = [
    "BLOCK_SIZE",
    "MaskMod",
    "block_density",
    "block_mask_from_routing",
    "cached_block_mask",
    "check_flex_inputs",
    "clear_block_mask_cache",
    "default_compile",
    "flex_supported",
    "flex_usable",
    "from_tile_major",
    "ideal_density",
    "needs_grad",
    "pick_tile",
    "run_flex",
    "to_tile_major",
    "token_coords",
]
