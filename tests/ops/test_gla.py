"""gla: chunked and step forms against the fp32 token-by-token reference (outputs, final state, every
gradient), packing, carried state, causality, strong decay at long T, and input errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_chunk_matches_reference

from gatelab.ops import gla
from gatelab.ops.gla import CHUNK_SIZE, gla_attention_matrix, gla_chunk, gla_reference
from gatelab.testing import assert_close

# (B, T, H, K, V, chunk_size): T=1, T just under/over a chunk, D=60, B=3, a chunk that is no power of two
SHAPES = [(2, 1, 2, 16, 16, 64), (1, 63, 2, 32, 32, 64), (3, 65, 2, 60, 40, 64), (2, 50, 1, 16, 24, 12)]


def make_inputs(B, T, H, K, V, strength=16.0, state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 2) / strength  # the paper's gate, normaliser 16
    h0 = torch.randn(B, H, K, V, generator=gen) if state else None
    return q, k, v, g, h0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}C{}".format(*s))
def test_chunk_matches_reference(shape, dtype):
    *dims, C = shape
    q, k, v, g, h0 = make_inputs(*dims, strength=4.0)
    check_chunk_matches_reference(gla, dict(q=q, k=k, v=v, g=g, h0=h0), C, dtype)


def test_chunk_matches_recurrent_and_auto():
    q, k, v, g, h0 = make_inputs(2, 70, 3, 16, 8)
    o_c, s_c = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="chunk", chunk_size=32)
    o_r, s_r = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="recurrent")
    o_a, s_a = gla(q, k, v, g, initial_state=h0, output_final_state=True)  # "auto" on CPU: the chunked form
    assert_close("o recurrent", o_r, o_c)
    assert_close("state recurrent", s_r, s_c)
    # "auto" on CPU: the chunked form with its own chunk size
    assert torch.equal(o_a, gla_chunk(q, k, v, g, initial_state=h0, chunk_size=CHUNK_SIZE["chunk"])[0])
    assert gla(q, k, v, g)[1] is None


def test_attention_matrix_is_the_operator():
    q, k, v, g, _ = make_inputs(2, 20, 2, 8, 6, strength=2.0)
    A = gla_attention_matrix(q, k, g)  # (B, H, T, T)
    assert torch.equal(A.triu(1), torch.zeros_like(A))
    o = torch.einsum("bhij,bjhv->bihv", A, v)
    assert_close("A v", o, gla_reference(q, k, v, g)[0])


@pytest.mark.parametrize("backend", ["chunk", "recurrent", "reference"])
def test_packed_equals_separate(backend):
    lengths = [5, 64, 31]
    q, k, v, g, _ = make_inputs(1, sum(lengths), 2, 16, 8)
    h0 = torch.randn(len(lengths), 2, 16, 8)
    cu = torch.tensor([0, 5, 69, 100], dtype=torch.int32)
    o, s = gla(
        q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend, chunk_size=16
    )
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = gla_reference(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], initial_state=h0[i : i + 1], output_final_state=True
        )
        assert_close(f"o seq {i}", o[:, a:b], o_i)
        assert_close(f"state seq {i}", s[i : i + 1], s_i)


def test_state_carried_over_two_calls():
    q, k, v, g, h0 = make_inputs(2, 90, 2, 16, 8)
    o_full, s_full = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, s1 = gla(q[:, :37], k[:, :37], v[:, :37], g[:, :37], initial_state=h0, output_final_state=True)
    o2, s2 = gla(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o_full)
    assert_close("state", s2, s_full)


def test_no_lookahead():
    q, k, v, g, _ = make_inputs(1, 80, 2, 16, 8)
    o1, _ = gla(q, k, v, g)
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2):
        x[:, 40:] = torch.randn_like(x[:, 40:])
    g2[:, 40:] = -5.0
    o2, _ = gla(q2, k2, v2, g2)
    assert torch.equal(o1[:, :40], o2[:, :40])
    assert (o1[:, 40:] - o2[:, 40:]).abs().max() > 1e-3


def test_strong_decay_long_sequence_is_finite_and_exact():
    # Half the channels forget at once (alpha = exp(-60) ~ 1e-26), half barely decay (cumulative log decay
    # reaches -16 over T): no exp(b_i) * exp(-b_j) split survives either; the step form is the yardstick.
    T, K = 16384, 16
    q, k, v = (torch.randn(1, T, 1, K) for _ in range(3))
    g = torch.full((1, T, 1, K), -60.0)
    g[..., : K // 2] = -1e-3
    o, s = gla(q, k, v, g, output_final_state=True, backend="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_r, s_r = gla(q, k, v, g, output_final_state=True, backend="recurrent")
    assert_close("o", o, o_r)
    assert_close("state", s, s_r)


def test_bad_inputs():
    q, k, v, g, h0 = make_inputs(2, 10, 2, 8, 4)
    with pytest.raises(ValueError, match="g is a log decay and must be <= 0"):
        gla(q, k, v, g.abs() + 0.1)
    with pytest.raises(ValueError, match="finite"):
        gla(q, k, v, torch.full_like(g, float("nan")))
    with pytest.raises(ValueError, match=r"g must have the shape of k"):
        gla(q, k, v, g[..., :1])
    with pytest.raises(ValueError, match="batch size must be 1 when cu_seqlens is given, got 2"):
        gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    q1, k1, v1, g1 = q[:1], k[:1], v[:1], g[:1]
    with pytest.raises(ValueError, match="strictly increasing"):
        gla(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="one state per sequence|initial_state must have shape"):
        gla(q1, k1, v1, g1, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=h0[:1])
    with pytest.raises(TypeError, match="dtype"):
        gla(q, k.bfloat16(), v, g)
    with pytest.raises(ValueError, match="device"):
        gla(q, k, v, g.to("meta"))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B or N, H, K, V\)"):
        gla(q, k, v, g, initial_state=h0[..., :3])
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        gla(q, k, v, g, backend="fast")


def test_explicit_triton_unavailable_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, _ = make_inputs(1, 4, 1, 8, 4)
    with pytest.raises(RuntimeError, match="not available"):
        gla(q, k, v, g, backend="triton")


def test_chunk_groups_match(monkeypatch):
    # long inputs run the intra-chunk part a group of chunks at a time; force one chunk per group
    import importlib

    monkeypatch.setattr(importlib.import_module("gatelab.ops.common.chunk"), "GROUP_ELEMENTS", 1)
    q, k, v, g, h0 = make_inputs(2, 100, 2, 8, 8, strength=2.0)
    o, s = gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16, backend="chunk")
    o_ref, s_ref = gla_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    assert_close("o", o, o_ref)
    assert_close("state", s, s_ref)


def test_intra_chunk_backward_passes_gradcheck():
    """The hand-written backward of the sub-chunked scores against finite differences in fp64, with a
    sub-chunk size that splits the chunk into several blocks (between and inside sub-chunks)."""
    from gatelab.ops.gla.chunk import intra_chunk_scores

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 12, 5, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    g = F.logsigmoid(torch.randn(2, 3, 12, 5, dtype=torch.float64, generator=gen))
    b = g.cumsum(-2).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, b: intra_chunk_scores(q, k, b, 4), (q, k, b))
