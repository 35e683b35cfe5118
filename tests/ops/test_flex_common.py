"""The shared FlexAttention helpers: block-mask cache, routed block masks, runner, tile-major orders."""

import pytest
import torch

from gatelab.ops.common import flex
from gatelab.testing import assert_close


def dense_attention(q, k, v, mask):
    """(B, T, H, D) fp32 attention with a (Tq, S) bool mask."""
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v.float())


def test_cached_block_mask_is_built_once_per_shape():
    calls = []

    def make():
        calls.append(1)
        return lambda b, h, q, k: q >= k

    flex.clear_block_mask_cache()
    a = flex.cached_block_mask(("causal-test",), make, 100, 100, "cpu")
    b = flex.cached_block_mask(("causal-test",), make, 100, 100, "cpu")
    c = flex.cached_block_mask(("causal-test",), make, 130, 130, "cpu")
    assert a is b and a is not c and len(calls) == 2
    assert flex.block_density(c) == pytest.approx(3 / 4)  # 2 x 2 blocks of 128, lower triangle


def test_routed_block_mask_agrees_with_its_mask_mod():
    # 4 query blocks of 16, each reads key block 0 and its own block: eager flex applies only the mask_mod,
    # so the mask_mod must say the same; the compiled kernel visits only the listed blocks.
    T, blk = 64, 16
    kv_num = torch.full((1, 1, 4), 2, dtype=torch.int32)
    kv_idx = torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    kv_idx[0, 0, :, 1] = torch.arange(4)
    kv_idx[0, 0, 0, 1] = 1  # block 0 reads blocks 0 and 1
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        allowed[i, kv_idx[0, 0, i, :2].long()] = True

    def mask_mod(b, h, q_idx, kv_idx_):
        return allowed[q_idx // blk, kv_idx_ // blk]

    bm = flex.block_mask_from_routing(kv_num, kv_idx, mask_mod, T, T, block_size=blk)
    dense = bm.to_dense()[0, 0].bool()
    assert torch.equal(dense, allowed)
    q, k, v = (torch.randn(2, T, 2, 8) for _ in range(3))
    mask = allowed.repeat_interleave(blk, 0).repeat_interleave(blk, 1)
    o = flex.run_flex(q, k, v, bm, compile=False)
    assert_close("routed flex", o, dense_attention(q, k, v, mask), torch.float32)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        flex.block_mask_from_routing(kv_num[0], kv_idx, mask_mod, T, T, block_size=blk)


@pytest.mark.parametrize("spatial,tile", [((8, 12), (4, 4)), ((4, 6, 8), (2, 3, 4)), ((12,), (4,))])
def test_tile_major_round_trip_and_coords(spatial, tile):
    x = torch.randn(2, *spatial, 3, 5)
    y = flex.to_tile_major(x, spatial, tile)  # (B, N, 3, 5)
    assert torch.equal(flex.from_tile_major(y, spatial, tile), x)
    # the first tile holds exactly the tokens with every coordinate below its tile size
    n = len(spatial)
    first = y[:, : torch.tensor(tile).prod()]
    expected = x[(slice(None), *(slice(0, t) for t in tile))].reshape(2, -1, 3, 5)
    assert torch.equal(first, expected)
    # token_coords inverts the order: coordinate lookups agree with the permuted tensor
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(s) for s in spatial), indexing="ij"), -1
    )  # (*spatial, n)
    coords = flex.to_tile_major(grid[None], spatial, tile)[0]  # (N, n)
    idx = torch.arange(coords.shape[0])
    got = torch.stack(flex.token_coords(idx, spatial, tile), -1)
    assert torch.equal(got, coords) and got.shape[-1] == n
    row_major = torch.stack(flex.token_coords(idx, spatial), -1)
    assert torch.equal(row_major, grid.reshape(-1, n))


def test_pick_tile():
    assert flex.pick_tile((64, 64), 128) in ((8, 16), (16, 8))
    assert flex.pick_tile((8, 8, 8), 64) == (4, 4, 4)
    assert flex.pick_tile((6, 10), 128) is None


def test_cpu_backward_raises_clearly():
    q = torch.randn(1, 8, 2, 4, requires_grad=True)
    assert not flex.flex_usable(q)
    with pytest.raises(RuntimeError, match="no backward on CPU.*reference"):
        flex.check_flex_inputs("demo", q, q.detach())
    with torch.no_grad():
        assert flex.flex_usable(q)
        flex.check_flex_inputs("demo", q)


def test_default_compile_policy(monkeypatch):
    q = torch.zeros(1, 64, 1, 4)
    monkeypatch.delenv("GATELAB_FLEX_COMPILE", raising=False)
    assert not flex.default_compile(q, 64)
    assert flex.default_compile(torch.zeros(1, 2048, 1, 4), 1024)
    monkeypatch.setenv("GATELAB_FLEX_COMPILE", "1")
    assert flex.default_compile(q, 64)


def test_tile_major_needs_dividing_tiles():
    with pytest.raises(ValueError, match="multiple of its tile"):
        flex.to_tile_major(torch.randn(1, 6, 8, 2), (6, 8), (4, 4))
