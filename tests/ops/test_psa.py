"""Pyramid Sparse Attention: levels under the budget, pooled keys standing for their tokens, the flex
backend against the reference, dense at level 1 everywhere."""

import math

import pytest
import torch

from gatelab.ops.psa import psa, psa_levels
from gatelab.ops.softmax import softmax
from gatelab.testing import TOLERANCE, assert_close, compare_grads

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BUDGET = (0.25, 0.25, 0.2, 0.2)


def inputs(B, T, H, D, Hkv=None, dtype=torch.float32):
    """q, k, v rounded to ``dtype`` (so a reference in fp32 sees the very values the fast path sees)."""
    Hkv = Hkv or H
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    return tuple(x.to(dtype) for x in (q, k, v))


@pytest.mark.parametrize("shape", [(1, 1, 2, 16), (3, 63, 2, 60), (2, 65, 4, 32)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_at_level_one_is_dense_attention(shape, causal):
    B, T, H, D = shape
    tensors = dict(zip("qkv", inputs(B, T, H, D, Hkv=1 if H > 1 else None)))
    for t in tensors.values():
        t.requires_grad_(True)
    options = dict(budget=(1.0, 0.0, 0.0, 0.0), block_size_k=8, causal=causal)
    compare_grads(
        tensors,
        lambda x: psa(x["q"], x["k"], x["v"], backend="reference", **options),
        lambda x: softmax(x["q"], x["k"], x["v"], causal=causal, backend="reference"),
        torch.float32,
    )
    with torch.no_grad():
        o = psa(*tensors.values(), backend="flex", **options)
    assert_close("flex at level 1", o, softmax(*tensors.values(), causal=causal, backend="reference"))


@pytest.mark.parametrize("causal", [True, False])
def test_pooled_key_stands_for_its_tokens(causal):
    """Keys and values equal within each group of 8: a mix of levels gives the dense output only because the
    + log(level) correction makes one pooled key worth the tokens it averages; flex agrees."""
    B, T, H, D = 2, 128, 2, 16
    q, k, v = inputs(B, T, H, D)
    k, v = (x[:, ::8].repeat_interleave(8, dim=1) for x in (k, v))
    options = dict(budget=(0.25, 0.25, 0.25, 0.25), block_size_k=16, causal=causal)
    levels = psa_levels(
        q, k, block_size_q=1, block_size_k=16, causal=causal, scale=D**-0.5, budget=options["budget"]
    )
    assert {2, 4, 8} <= set(levels.unique().tolist())  # the pooled levels are really used
    dense = softmax(q, k, v, causal=causal, backend="reference")
    assert_close("psa reference", psa(q, k, v, backend="reference", **options), dense)
    assert_close("psa flex", psa(q, k, v, backend="flex", **options), dense)


FLEX_CASES = [  # (shape, dtype, block_size_q, causal)
    ((1, 1, 2, 16), torch.float32, 1, True),
    ((3, 63, 2, 60), torch.float32, 1, True),
    ((3, 63, 2, 60), torch.bfloat16, 16, True),
    ((2, 65, 4, 32), torch.bfloat16, 1, True),
    ((2, 65, 4, 32), torch.float32, 16, False),
    ((3, 63, 2, 60), torch.bfloat16, 1, False),
]


@pytest.mark.parametrize("shape, dtype, block_size_q, causal", FLEX_CASES, ids=str)
def test_flex_matches_reference(shape, dtype, block_size_q, causal):
    B, T, H, D = shape
    q, k, v = inputs(B, T, H, D, dtype=dtype)
    options = dict(budget=BUDGET, block_size_q=block_size_q, block_size_k=8, causal=causal)
    with torch.no_grad():
        o = psa(q, k, v, backend="flex", **options)
    expected = psa(q.float(), k.float(), v.float(), backend="reference", **options)
    assert o.dtype == dtype
    assert_close("psa flex", o.float(), expected, dtype)
    if T > 16:  # blocks are pooled or skipped: PSA is not dense attention here
        dense = softmax(q.float(), k.float(), v.float(), causal=causal, backend="reference")
        assert (expected - dense).abs().max() > 10 * TOLERANCE[dtype]


def test_levels_follow_the_budget():
    q, k, _ = inputs(2, 96, 3, 16)
    levels = psa_levels(
        q, k, budget=BUDGET, block_size_q=1, block_size_k=8, causal=True, scale=0.25
    )  # (B, H, T, nK)
    own = torch.arange(96) // 8
    for t in (40, 95):
        row = levels[:, :, t]  # (B, H, nK)
        n = int(own[t])  # past blocks: the candidates
        assert (row[..., own[t]] == 1).all() and (row[..., own[t] + 1 :] == 0).all()
        cumulative = [math.ceil(n * sum(BUDGET[: i + 1]) - 1e-6) for i in range(4)]
        counts = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
        for lvl, count in zip((1, 2, 4, 8), counts):
            past = row[..., : own[t]]
            assert (past == lvl).sum(-1).eq(count).all(), (t, lvl)


def test_most_important_blocks_get_the_finest_level():
    """A key block aligned with every query is kept at full resolution."""
    T, D = 64, 16
    u = torch.randn(D)
    q = u.expand(1, T, 1, D).clone()
    k = 0.1 * torch.randn(1, T, 1, D)
    k[:, 16:24] = 2 * u
    levels = psa_levels(
        q, k, budget=(0.2, 0.2, 0.2, 0.2), block_size_q=1, block_size_k=8, causal=True, scale=0.25
    )
    assert (levels[0, 0, 24:, 2] == 1).all()


def test_decode_reproduces_the_parallel_pass():
    q, k, v = inputs(2, 40, 2, 16)
    options = dict(budget=BUDGET, block_size_k=8, backend="reference")
    full = psa(q, k, v, **options)
    steps = [psa(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **options) for t in range(40)]
    assert_close("decode", torch.cat(steps, dim=1), full)


def test_errors():
    q, k, v = inputs(1, 16, 2, 16)
    with pytest.raises(ValueError, match="budget"):
        psa(q, k, v, budget=(0.5, 0.5))
    with pytest.raises(ValueError, match="budget"):
        psa(q, k, v, budget=(0.0, 0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match="sum to at most 1"):
        psa(q, k, v, budget=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="multiple of 8"):
        psa(q, k, v, block_size_k=12)
    with pytest.raises(ValueError, match="unknown backend"):
        psa(q, k, v, backend="sdpa")
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        psa(q.requires_grad_(), k, v, backend="flex")


def test_mixer_with_softmax_weights():
    """The PSA mixer has the softmax mixer's parameters: at budget (1, 0, 0, 0) it is that layer; its
    internals give per-key weights that reproduce the attention output."""
    import gatelab

    torch.manual_seed(0)
    dense = gatelab.make_mixer("softmax", d_model=32, n_heads=2).eval()
    x = torch.randn(2, 40, 32)
    full = gatelab.make_mixer(
        "psa", d_model=32, n_heads=2, budget=(1.0, 0.0, 0.0, 0.0), block_size_k=8
    ).eval()
    sparse = gatelab.make_mixer("psa", d_model=32, n_heads=2, budget=BUDGET, block_size_k=8).eval()
    full.load_state_dict(dense.state_dict())
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert_close("psa at level 1 == softmax layer", full(x)[0], dense(x)[0])
        y, _, internals = sparse(x, return_internals=True)
    assert (y - dense(x)[0]).abs().max() > 1e-3
    attn = internals["attn"]  # (B, H, T, T)
    assert attn.shape == (2, 2, 40, 40) and torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    assert (attn.triu(1) == 0).all()  # causal
    assert set(internals["levels"].unique().tolist()) <= {0, 1, 2, 4, 8}
    with pytest.raises(ValueError, match="multiple of 8"):
        gatelab.make_mixer("psa", d_model=32, n_heads=2, block_size_k=12)
