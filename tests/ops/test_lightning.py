"""lightning: chunked and step forms against the fp32 token-by-token reference (outputs, final state, every
gradient including the decay's), per-head and per-token decays, packing, carried state, causality, strong
decay at long T, and input errors."""

import pytest
import torch
from helpers import check_chunk_matches_reference

from gatelab.ops import lightning
from gatelab.ops.lightning import (
    alibi_slopes,
    lightning_attention_matrix,
    lightning_chunk,
    lightning_reference,
)
from gatelab.testing import assert_close

# (B, T, H, K, V, chunk_size): T=1, T just under/over a chunk, D=60, B=3, a chunk that is no power of two
SHAPES = [(2, 1, 2, 16, 16, 64), (1, 63, 4, 32, 32, 64), (3, 65, 2, 60, 40, 64), (2, 50, 3, 16, 24, 12)]


def make_inputs(B, T, H, K, V, per_token=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    decay = -alibi_slopes(H)  # (H,), as Lightning Attention sets it
    if per_token:
        decay = decay * torch.rand(B, T, H, generator=gen) * 2  # (B, T, H)
    h0 = torch.randn(B, H, K, V, generator=gen)
    return q, k, v, decay, h0


def test_alibi_slopes():
    # lambda_h = exp(-2^(-8h/H)), h = 1..H
    assert torch.allclose(alibi_slopes(8), 2.0 ** (-torch.arange(1, 9.0)))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    assert alibi_slopes(6).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("per_token", [False, True], ids=["decay(H)", "decay(B,T,H)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}C{}".format(*s))
def test_chunk_matches_reference(shape, dtype, per_token):
    *dims, C = shape
    q, k, v, decay, h0 = make_inputs(*dims, per_token=per_token)
    check_chunk_matches_reference(lightning, dict(q=q, k=k, v=v, decay=decay, h0=h0), C, dtype)


def test_chunk_matches_recurrent_and_auto():
    q, k, v, decay, h0 = make_inputs(2, 70, 3, 16, 8, per_token=True)
    o_c, s_c = lightning(
        q, k, v, decay, initial_state=h0, output_final_state=True, backend="chunk", chunk_size=32
    )
    o_r, s_r = lightning(q, k, v, decay, initial_state=h0, output_final_state=True, backend="recurrent")
    o_a, _ = lightning(q, k, v, decay, initial_state=h0)  # "auto" on CPU: the chunked form
    assert_close("o recurrent", o_r, o_c)
    assert_close("state recurrent", s_r, s_c)
    assert torch.equal(o_a, lightning_chunk(q, k, v, decay, initial_state=h0)[0])


def test_attention_matrix_is_the_operator():
    q, k, v, decay, _ = make_inputs(2, 20, 2, 8, 6, per_token=True)
    A = lightning_attention_matrix(q, k, decay)  # (B, H, T, T)
    assert torch.equal(A.triu(1), torch.zeros_like(A))
    assert_close("A v", torch.einsum("bhij,bjhv->bihv", A, v), lightning_reference(q, k, v, decay)[0])


@pytest.mark.parametrize("per_token", [False, True], ids=["decay(H)", "decay(B,T,H)"])
@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
def test_packed_equals_separate(backend, per_token):
    q, k, v, decay, _ = make_inputs(1, 100, 2, 16, 8, per_token=per_token)
    h0 = torch.randn(3, 2, 16, 8)
    cu = torch.tensor([0, 5, 69, 100], dtype=torch.int32)
    o, s = lightning(
        q,
        k,
        v,
        decay,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu,
        backend=backend,
        chunk_size=16,
    )
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        d_i = decay if decay.ndim == 1 else decay[:, a:b]
        o_i, s_i = lightning_reference(
            q[:, a:b], k[:, a:b], v[:, a:b], d_i, initial_state=h0[i : i + 1], output_final_state=True
        )
        assert_close(f"o seq {i}", o[:, a:b], o_i)
        assert_close(f"state seq {i}", s[i : i + 1], s_i)


def test_state_carried_over_two_calls():
    q, k, v, decay, h0 = make_inputs(2, 90, 2, 16, 8)
    o_full, s_full = lightning(q, k, v, decay, initial_state=h0, output_final_state=True)
    o1, s1 = lightning(q[:, :37], k[:, :37], v[:, :37], decay, initial_state=h0, output_final_state=True)
    o2, s2 = lightning(q[:, 37:], k[:, 37:], v[:, 37:], decay, initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o_full)
    assert_close("state", s2, s_full)


def test_no_lookahead():
    q, k, v, decay, _ = make_inputs(1, 80, 2, 16, 8, per_token=True)
    o1, _ = lightning(q, k, v, decay)
    q2, k2, v2, d2 = (x.clone() for x in (q, k, v, decay))
    for x in (q2, k2, v2):
        x[:, 40:] = torch.randn_like(x[:, 40:])
    d2[:, 40:] = -3.0
    o2, _ = lightning(q2, k2, v2, d2)
    assert torch.equal(o1[:, :40], o2[:, :40])
    assert (o1[:, 40:] - o2[:, 40:]).abs().max() > 1e-3


def test_strong_decay_long_sequence_is_finite_and_exact():
    # Head 0 forgets at once (decay exp(-60)), head 1 barely decays (cumulative log decay -16 over T).
    T, K = 16384, 16
    q, k, v = (torch.randn(1, T, 2, K) for _ in range(3))
    decay = torch.tensor([-60.0, -1e-3])
    o, s = lightning(q, k, v, decay, output_final_state=True, backend="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_r, s_r = lightning(q, k, v, decay, output_final_state=True, backend="recurrent")
    assert_close("o", o, o_r)
    assert_close("state", s, s_r)
    # alpha ~ 0: o_t = scale * (q_t . k_t) v_t exactly
    only_now = (q[:, :, 0] * k[:, :, 0]).sum(-1, keepdim=True) * K**-0.5 * v[:, :, 0]
    assert_close("forgetting head", o[:, :, 0], only_now)


def test_bad_inputs():
    q, k, v, decay, h0 = make_inputs(2, 10, 2, 8, 4)
    with pytest.raises(ValueError, match="decay is a log decay and must be <= 0"):
        lightning(q, k, v, -decay)
    with pytest.raises(ValueError, match=r"decay must have shape \(H,\)"):
        lightning(q, k, v, decay[:1])
    with pytest.raises(ValueError, match="dims"):
        lightning(q, k, v, decay[None])
    with pytest.raises(ValueError, match="batch size must be 1 when cu_seqlens is given, got 2"):
        lightning(q, k, v, decay, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        lightning(q[:1], k[:1], v[:1], decay, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        lightning(q, k, v.double(), decay)
    with pytest.raises(ValueError, match="device"):
        lightning(q, k, v, decay.to("meta"))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B or N, H, K, V\)"):
        lightning(q, k, v, decay, initial_state=h0[:1])
    with pytest.raises(ValueError, match="unknown backend"):
        lightning(q, k, v, decay, backend="fast")


def test_chunk_groups_match(monkeypatch):
    # long inputs run the intra-block part a group of blocks at a time; force one block per group
    import importlib

    monkeypatch.setattr(importlib.import_module("gatelab.ops.common.chunk"), "GROUP_ELEMENTS", 1)
    q, k, v, decay, h0 = make_inputs(2, 100, 2, 8, 8, per_token=True)
    o, s = lightning(
        q, k, v, decay, initial_state=h0, output_final_state=True, chunk_size=16, backend="chunk"
    )
    o_ref, s_ref = lightning_reference(q, k, v, decay, initial_state=h0, output_final_state=True)
    assert_close("o", o, o_ref)
    assert_close("state", s, s_ref)
