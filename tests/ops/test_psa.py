"""Pyramid Sparse Attention: levels under the budget, pooled keys standing for their tokens, the flex
backend against the reference, dense at level 1 everywhere."""

import math

import pytest
import torch
from helpers import (
    SPARSE_FLEX_CASES,
    SPARSE_SHAPES,
    check_decode_matches_parallel,
    check_dense_when_nothing_is_pruned,
    check_flex_matches_reference,
)
from helpers import qkv_inputs as inputs

from gatelab.ops.psa import psa, psa_levels
from gatelab.ops.softmax import softmax
from gatelab.testing import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BUDGET = (0.25, 0.25, 0.2, 0.2)


@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_at_level_one_is_dense_attention(shape, causal):
    options = dict(budget=(1.0, 0.0, 0.0, 0.0), block_size_k=8, causal=causal)
    check_dense_when_nothing_is_pruned(psa, shape, "flex at level 1", **options)


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


@pytest.mark.parametrize("shape, dtype, block_size_q, causal", SPARSE_FLEX_CASES, ids=str)
def test_flex_matches_reference(shape, dtype, block_size_q, causal):
    options = dict(budget=BUDGET, block_size_q=block_size_q, block_size_k=8, causal=causal)
    pruned = shape[1] > 16  # blocks are pooled or skipped: PSA is not dense attention here
    check_flex_matches_reference(psa, shape, dtype, "psa flex", pruned, **options)


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
    check_decode_matches_parallel(psa, budget=BUDGET, block_size_k=8, backend="reference")


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
