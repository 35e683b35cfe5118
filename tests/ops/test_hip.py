"""HiP attention: the hierarchical mask, the flex backend against the reference, dense at full budget."""

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

from gatelab.ops.hip import hip, hip_select
from gatelab.testing import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_is_dense_attention(shape, causal):
    options = dict(topk=shape[1], block_size_k=4, sinks=0, window=0, causal=causal)
    check_dense_when_nothing_is_pruned(hip, shape, "flex at full budget", **options)


@pytest.mark.parametrize("shape, dtype, block_size_q, causal", SPARSE_FLEX_CASES, ids=str)
def test_flex_matches_reference(shape, dtype, block_size_q, causal):
    options = dict(topk=2, block_size_q=block_size_q, block_size_k=8, sinks=2, window=4, causal=causal)
    pruned = shape[1] > 8 * 2 + 4  # some keys are pruned: HiP is not dense attention here
    check_flex_matches_reference(hip, shape, dtype, "hip flex", pruned, **options)


def test_mask_keeps_topk_blocks_in_the_causal_past():
    q, k, _ = inputs(2, 80, 3, 16)
    selected = hip_select(
        q, k, topk=3, block_size_q=1, block_size_k=8, causal=True, scale=0.25
    )  # (B, H, T, nK)
    available = torch.arange(80) // 8 + 1  # key blocks a query may touch
    expected = available.clamp(max=3).expand(2, 3, 80)
    assert torch.equal(selected.sum(-1), expected)
    future = torch.arange(10)[None, :] > (torch.arange(80) // 8)[:, None]  # (T, nK)
    assert not (selected & future).any()


def test_hierarchy_finds_the_relevant_key_blocks():
    """A run of keys aligned with every query: the halving search must end on those blocks."""
    T, D = 128, 16
    u = torch.randn(D)
    q = u.expand(1, T, 1, D).clone()
    k = 0.1 * torch.randn(1, T, 1, D)
    k[:, 32:64] = 3 * u  # key blocks 4..7 of 8 tokens
    selected = hip_select(q, k, topk=2, block_size_q=1, block_size_k=8, causal=True, scale=D**-0.5)[0, 0]
    later = selected[64:]  # queries that can see the whole run
    assert later.sum(-1).eq(2).all()
    assert not later[:, :4].any() and not later[:, 8:].any()


def test_decode_reproduces_the_parallel_pass():
    """block_size_q=1: a query's mask depends only on itself and the keys up to it."""
    check_decode_matches_parallel(hip, topk=2, block_size_k=4, sinks=1, window=3, backend="reference")


def test_errors():
    q, k, v = inputs(1, 8, 2, 16)
    with pytest.raises(ValueError, match="topk"):
        hip(q, k, v, topk=0)
    with pytest.raises(ValueError, match="block_size_k"):
        hip(q, k, v, block_size_k=0)
    with pytest.raises(ValueError, match="window"):
        hip(q, k, v, window=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        hip(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="at least as many keys"):
        hip(q, k[:, :4], v[:, :4])
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        hip(q.requires_grad_(), k, v, backend="flex")


def test_mixer_plugs_into_a_pretrained_softmax_layer():
    """Training-free: a softmax layer's weights load into the HiP mixer as they are; at full budget it is
    the same layer, with a small budget it prunes."""
    import gatelab

    torch.manual_seed(0)
    dense = gatelab.make_mixer("softmax", d_model=32, n_heads=2).eval()
    x = torch.randn(2, 40, 32)
    for topk, same in ((64, True), (1, False)):
        sparse = gatelab.make_mixer(
            "hip", d_model=32, n_heads=2, topk=topk, block_size_k=4, sinks=0, window=1
        ).eval()
        sparse.load_state_dict(dense.state_dict())
        with torch.no_grad():
            y_sparse, y_dense = sparse(x)[0], dense(x)[0]
        if same:
            assert_close("hip at full budget == softmax layer", y_sparse, y_dense)
        else:
            assert (y_sparse - y_dense).abs().max() > 1e-3
    with pytest.raises(ValueError, match="topk"):
        gatelab.make_mixer("hip", d_model=32, n_heads=2, topk=0)
    with pytest.raises(ValueError, match="window"):
        gatelab.make_mixer("hip", d_model=32, n_heads=2, window=-1)
    with pytest.raises(ValueError, match="backend"):
        gatelab.make_mixer("hip", d_model=32, n_heads=2, backend="sdpa")


def test_hip_and_psa_in_the_lm_decode_like_the_parallel_pass():
    from gatelab.lab.models.lm import LM, LMConfig

    options = {"hip": {"topk": 2, "block_size_k": 4, "sinks": 1, "window": 2}, "psa": {"block_size_k": 8}}
    lm = LM(
        LMConfig(d_model=32, n_heads=2, n_layers=2, pattern="hip,psa", mixer_options=options, seed=0)
    ).eval()
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        logits, _ = lm(idx)
        step_logits, states = lm(idx[:, :10])
        steps = [step_logits]
        for t in range(10, 30):
            out, states = lm(idx[:, t : t + 1], states)
            steps.append(out)
    assert_close("LM decode", torch.cat(steps, dim=1), logits)
