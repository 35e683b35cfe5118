"""Bi-level routing attention: routing against a brute-force loop, full attention at top-k = all regions,
the flex backend against the reference, and the (B, H, W, C) mixer."""

import pytest
import torch

from gatelab.ops.biformer import biformer, route
from gatelab.ops.biformer.reference import biformer_reference
from gatelab.ops.softmax import softmax
from gatelab.testing import TOLERANCE, assert_close, compare_grads

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def inputs(B, Hh, Ww, H, D, dtype=torch.float32):
    return tuple(torch.randn(B, Hh, Ww, H, D).to(dtype) for _ in range(3))


def full_attention(q, k, v):
    """Plain bidirectional softmax over all Hh * Ww tokens: (B, Hh, Ww, H, D)."""
    B, Hh, Ww, H, D = q.shape
    o = softmax(*(x.flatten(1, 2) for x in (q, k, v)), causal=False, backend="reference")
    return o.view(B, Hh, Ww, H, -1)


@pytest.mark.parametrize(
    "shape, regions", [((1, 2, 2, 1, 16), 1), ((3, 6, 10, 2, 60), (2, 5)), ((2, 8, 8, 4, 32), 4)], ids=str
)
def test_topk_all_regions_is_full_attention(shape, regions):
    q, k, v = inputs(*shape)
    n = regions * regions if isinstance(regions, int) else regions[0] * regions[1]
    tensors = {name: t.requires_grad_(True) for name, t in zip("qkv", (q, k, v))}
    compare_grads(
        tensors,
        lambda x: biformer(x["q"], x["k"], x["v"], regions=regions, topk=n, backend="reference"),
        lambda x: full_attention(x["q"], x["k"], x["v"]),
        torch.float32,
    )
    with torch.no_grad():
        o = biformer(q, k, v, regions=regions, topk=n, backend="flex")
    assert_close("flex, all regions", o, full_attention(q, k, v))


def test_routing_matches_a_brute_force_loop():
    q, k, _ = inputs(2, 6, 9, 2, 8)
    index = route(q, k, (2, 3), topk=2)  # (B, R, topk)
    for b in range(2):
        means = {}
        for name, x in (("q", q), ("k", k)):
            means[name] = torch.stack(
                [
                    x[b, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3].mean(dim=(0, 1)).flatten()
                    for i in range(2)
                    for j in range(3)
                ]
            )  # (R, H * D): region means over all heads
        affinity = means["q"] @ means["k"].T
        expected = affinity.topk(2, dim=-1).indices
        assert torch.equal(index[b].sort(-1).values, expected.sort(-1).values)


def test_tokens_see_only_their_routed_regions():
    q, k, v = inputs(1, 4, 4, 2, 8)
    o, probs = biformer_reference(q, k, v, grid=(2, 2), topk=1, scale=8**-0.5, return_probs=True)
    index = route(q, k, (2, 2), topk=1)[0, :, 0]  # (R,) the one routed region of each region
    region = (torch.arange(4)[:, None] // 2 * 2 + torch.arange(4)[None, :] // 2).flatten()  # (N,) row-major
    allowed = region[None, :] == index[region][:, None]  # (N, N)
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    assert (probs[0][:, ~allowed] == 0).all() and (probs[0][:, allowed] > 0).all()
    dense = torch.einsum("hts,bshd->bthd", probs[0], v.flatten(1, 2)).view_as(o)
    assert_close("probs reproduce the output", o, dense)


@pytest.mark.parametrize(
    "shape, regions, topk, dtype",
    [
        ((1, 2, 2, 1, 16), 2, 1, torch.float32),
        ((3, 6, 10, 2, 60), (2, 5), 3, torch.float32),
        ((2, 8, 8, 4, 32), 4, 5, torch.bfloat16),
    ],
    ids=str,
)
def test_flex_matches_reference(shape, regions, topk, dtype):
    q, k, v = inputs(*shape, dtype=dtype)
    with torch.no_grad():
        o = biformer(q, k, v, regions=regions, topk=topk, backend="flex")
    expected = biformer(q.float(), k.float(), v.float(), regions=regions, topk=topk, backend="reference")
    assert o.dtype == dtype
    assert_close("biformer flex", o.float(), expected, dtype)
    assert (expected - full_attention(q.float(), k.float(), v.float())).abs().max() > 10 * TOLERANCE[dtype]


def test_errors():
    q, k, v = inputs(1, 6, 6, 2, 8)
    with pytest.raises(ValueError, match="divisible"):
        biformer(q, k, v, regions=4)
    with pytest.raises(ValueError, match="topk"):
        biformer(q, k, v, regions=3, topk=10)
    with pytest.raises(ValueError, match="5 dims"):
        biformer(q.flatten(1, 2), k, v, regions=3)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        biformer(q.requires_grad_(), k, v, regions=3, topk=2, backend="flex")


def test_mixer_on_a_map():
    from gatelab.mixers.biformer import BiformerAttention, BiformerConfig

    torch.manual_seed(0)
    mixer = BiformerAttention(BiformerConfig(d_model=32, n_heads=4, regions=2, topk=2, lce_kernel=3))
    x = torch.randn(2, 6, 8, 32, requires_grad=True)
    y, state, internals = mixer(x, return_internals=True)
    assert y.shape == x.shape and state is None
    assert internals["attn"].shape == (2, 4, 48, 48) and internals["routing"].shape == (2, 4, 2)
    y.square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Without LCE the output is the routed attention through the output projection, nothing else.
    mixer.lce.weight.data.zero_()
    mixer.lce.bias.data.zero_()
    with torch.no_grad():
        y, _ = mixer(x)
        q, k, v = mixer.qkv(x).view(2, 6, 8, 3, 4, 8).unbind(dim=3)
        o = biformer(q, k, v, regions=2, topk=2, backend="reference").reshape(2, 6, 8, 32)
    assert_close("mixer without LCE", y, mixer.o_proj(o))
    with pytest.raises(ValueError, match="d_model"):
        mixer(torch.randn(2, 6, 8, 31))
    with pytest.raises(ValueError, match="divisible"):
        mixer(torch.randn(2, 5, 8, 32))
    with pytest.raises(ValueError, match="causal"):
        mixer(x, state=object())
    with pytest.raises(ValueError, match="causal=False"):
        BiformerConfig(d_model=32, n_heads=4, causal=True)
