"""NAtS-L: forced routes reduce to softmax / Gated DeltaNet, chunk causality, decode == parallel with the KV
cache holding only softmax-routed chunks, the straight-through choice, the routing record, bad options."""

import pytest
import torch

import gatelab
from gatelab.ops.gated_deltanet import gated_deltanet
from gatelab.ops.softmax import softmax
from gatelab.routers._common import straight_through, weighted_attention
from gatelab.routers.nats_l import NAtSLState
from gatelab.testing import assert_close

C = 4  # routed chunk in these tests


def build(**options):
    torch.manual_seed(0)
    options = {"d_model": 32, "n_heads": 2, "chunk_size": 4, "route_chunk": C, **options}
    return gatelab.make_mixer("nats_l", **options).eval()


def views(mixer, x):
    """The q/k/v both branches see: GDN's (B, T, H, *) and the softmax heads' (B, T, Ha, *)."""
    q, k, v, g, beta, _, _ = mixer.project(x, {})
    B, T, Ha = x.shape[0], x.shape[1], mixer._attn_heads
    qa = mixer.q_norm(q.reshape(B, T, Ha, -1))
    ka = mixer.k_norm(k.reshape(B, T, Ha, -1))
    return (q, k, v, g, beta), (qa, ka, v.reshape(B, T, Ha, -1))


@pytest.mark.parametrize("route", ["softmax", "linear"])
def test_forced_routes_reduce_to_softmax_attention_and_gated_deltanet(route):
    """All softmax: the softmax branch is causal softmax attention, the GDN branch restarts at every chunk
    (the zero state, decayed, stays zero). All linear: the GDN branch is Gated DeltaNet over the sequence,
    the softmax branch sees its own chunk only (NAtS-L never reduces to pure GDN: that term stays)."""
    mixer = build(route=route)
    x = torch.randn(2, 14, 32)
    with torch.no_grad():
        o_gdn, o_attn, *_ = mixer.branches(x)
        (q, k, v, g, beta), (qa, ka, va) = views(mixer, x)
        gdn = lambda *t: gated_deltanet(*t)[0]
        per_chunk = lambda op, *ts: torch.cat(
            [op(*(t[:, a : a + C] for t in ts)) for a in range(0, 14, C)], 1
        )
        if route == "softmax":
            expected_attn, expected_gdn = softmax(qa, ka, va), per_chunk(gdn, q, k, v, g, beta)
        else:
            expected_attn, expected_gdn = per_chunk(softmax, qa, ka, va), gdn(q, k, v, g, beta)
    assert_close("softmax branch", o_attn, expected_attn.float(), torch.float32)
    assert_close("gdn branch", o_gdn, expected_gdn, torch.float32)


def test_a_chunk_type_acts_only_on_later_chunks():
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        y_soft, _ = build(route="softmax")(x)
        y_lin, _ = build(route="linear")(x)
    torch.testing.assert_close(y_soft[:, :C], y_lin[:, :C], rtol=0, atol=0)  # chunk 0 precedes every choice
    assert (y_soft[:, C:] - y_lin[:, C:]).abs().max() > 1e-4


def test_future_chunks_do_not_change_the_past_nor_its_routing():
    mixer = build()
    x = torch.randn(2, 12, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 6, 32)  # mid-chunk: chunk 1's own route changes, chunk 0's does not
    with torch.no_grad():
        y1, _, i1 = mixer(x, return_internals=True)
        y2, _, i2 = mixer(x2, return_internals=True)
    torch.testing.assert_close(y1[:, :6], y2[:, :6], rtol=1e-6, atol=1e-6)
    assert torch.equal(i1["types"][..., 0], i2["types"][..., 0])


def mixed_router(mixer):
    """Router weights under which the chunks of the test input take both sides."""
    with torch.no_grad():
        mixer.route_proj.weight.normal_(std=2.0)
    return mixer


@pytest.mark.parametrize("prefix", [3, 4, 8, 9])  # mid-chunk and on chunk boundaries
def test_decode_matches_parallel_and_keeps_only_softmax_chunks(prefix):
    mixer = mixed_router(build())
    x = torch.randn(3, 21, 32)
    with torch.no_grad():
        y, state, internals = mixer(x, return_internals=True)
        types = internals["types"]  # (B, H, 5)
        assert 0 < types.mean() < 1, "the test needs chunks on both sides"
        outs, s = [], None
        y_pre, s = mixer(x[:, :prefix])
        outs.append(y_pre)
        for t in range(prefix, 21):
            y_t, s = mixer(x[:, t : t + 1], state=s)
            outs.append(y_t)
    assert_close("decode", torch.cat(outs, 1), y, torch.float32)
    for st in (state, s):
        kept = (st.keep > 0).sum(1)  # (B, Ha) kept keys per softmax head
        expected = types.sum(-1).repeat_interleave(mixer.config.attn_split, dim=1) * C
        assert torch.equal(kept, expected.long())
        assert st.k.shape[1] == int(kept.max()) and st.open_k.shape[1] == 21 % C
    assert_close("state", s.committed, state.committed, torch.float32)


def test_straight_through_forward_is_hard_and_gradient_reaches_the_router():
    mixer = mixed_router(build()).train()
    x = torch.randn(2, 12, 32)
    y, _, internals = mixer(x, return_internals=True)
    assert set(internals["types"].unique().tolist()) <= {0.0, 1.0}
    y.square().mean().backward()
    assert mixer.route_proj.weight.grad.abs().max() > 0
    soft = torch.tensor([0.3, 0.7], requires_grad=True)
    hard = torch.tensor([0.0, 1.0])
    out = straight_through(hard, soft)
    assert torch.equal(out, hard)  # bit for bit
    (out * torch.tensor([1.0, 2.0])).sum().backward()
    assert torch.equal(soft.grad, torch.tensor([1.0, 2.0]))


def test_router_gradient_is_the_codes_softmax_backward():
    """At w = 1 the gradient by key j's multiplier is the code's dS = P . (dP - delta), dP = dO v^T,
    delta = rowsum(dO . O): the same quantity its Triton backward sums over a chunk's keys."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    w = torch.ones(1, 2, 5, 5).tril().requires_grad_()
    o, p = weighted_attention(q, k, v, w)
    d_o = torch.randn_like(o)
    (o * d_o).sum().backward()
    d_p = torch.einsum("bthv,bshv->bhts", d_o, v)
    delta = (d_o * o).sum(-1).permute(0, 2, 1)[..., None]  # (B, H, T, 1)
    expected = (p * (d_p - delta)).detach()
    assert_close("dS", w.grad * w.detach(), expected, torch.float32)
    assert_close("masked softmax", o, softmax(q, k, v, backend="reference").float(), torch.float32)


def test_route_record_and_flops():
    x = torch.randn(2, 16, 32)
    records = {}
    for route in ("softmax", "linear"):
        mixer = build(route=route)
        with torch.no_grad():
            _, _, internals = mixer(x, return_internals=True)
        records[route] = (internals["route"], mixer.flops_per_token(1024))
    (soft, f_soft), (lin, f_lin) = records["softmax"], records["linear"]
    assert soft["unit"] == lin["unit"] == "chunks" and soft["expensive_fraction"].ndim == 0
    assert float(soft["expensive_fraction"]) == 1.0 and float(lin["expensive_fraction"]) == 0.0
    assert f_soft > f_lin > 0
    with pytest.raises(ValueError, match="seq_len"):
        build().flops_per_token(0)


def test_bad_options_and_states():
    with pytest.raises(ValueError, match="route_chunk"):
        build(route_chunk=0)
    with pytest.raises(ValueError, match="attn_split .3. must divide"):
        build(attn_split=3)
    with pytest.raises(ValueError, match="route"):
        build(route="both")
    with pytest.raises(ValueError, match="sample"):
        build(sample="topk")
    mixer = build()
    other = gatelab.make_mixer("gated_deltanet", d_model=32, n_heads=2)
    with torch.no_grad():
        _, recurrent = other(torch.randn(1, 3, 32))
        with pytest.raises(TypeError, match="NAtSLState"):
            mixer(torch.randn(1, 1, 32), state=recurrent)
        _, state = mixer(torch.randn(1, 3, 32))
    assert isinstance(state, NAtSLState) and state.kept_tokens == 3 * mixer._attn_heads


def test_the_backend_option_picks_the_gdn_branch_backend():
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        y_auto, _ = mixed_router(build())(x)
        y_ref, _ = mixed_router(build(backend="reference"))(x)
    assert_close("reference", y_ref, y_auto, torch.float32)
