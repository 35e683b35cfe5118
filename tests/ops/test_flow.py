"""flow: chunk and recurrent against the dense fp32 reference (outputs, final state, every gradient), the
official equations, packed sequences, carried state, causality, the bidirectional form, and input errors."""

import pytest
import torch
from helpers import detached

import gatelab
from gatelab.ops import flow
from gatelab.ops.flow import FlowState, flow_attention_matrix
from gatelab.testing import assert_close, compare_grads

FIELDS = FlowState._fields


def make_inputs(B, T, H, D, V=None, state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = V or D
    rand = lambda *shape: torch.randn(*shape, generator=g)
    tensors = {"q": rand(B, T, H, D), "k": rand(B, T, H, D), "v": rand(B, T, H, V)}
    if state:  # the sums after a 7-token prefix, so every field is consistent with the others
        _, h0 = flow(rand(B, 7, H, D), rand(B, 7, H, D), rand(B, 7, H, V), output_final_state=True)
        tensors.update({f"h0_{name}": x for name, x in zip(FIELDS, h0)})
    return {name: t.requires_grad_(name != "h0_count") for name, t in tensors.items()}


def state_of(t):
    return FlowState(*(t[f"h0_{name}"] for name in FIELDS)) if "h0_kv" in t else None


def runner(backend, causal=True, **options):
    def run(t):
        o, s = flow(
            t["q"],
            t["k"],
            t["v"],
            causal=causal,
            initial_state=state_of(t),
            output_final_state=causal,
            backend=backend,
            **options,
        )
        return (o,) if s is None else (o, *s)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [1, 63, 65])
def test_chunk_matches_reference(T, causal, dtype):
    tensors = make_inputs(3, T, 2, 60, state=causal)
    # One token without a state: the flows cancel to o = sigmoid(1) v up to eps, so dq and dk are pure eps
    # terms that any change of summation order drowns; a large eps makes them real.
    eps = 1.0 if T == 1 and not causal else 1e-6
    if dtype != torch.float32:
        # The conserved outgoing flow sits near its clamp at 1 by construction (conservation), and the clamp
        # cuts the gradient: bf16 rounding of the inputs moves tokens across it, changing d(initial_state.q_in)
        # by up to 5e-2 however the op is computed. Both sides get the same bf16-representable inputs instead,
        # so the comparison measures the fast path's own error.
        tensors = {
            name: x.detach().to(dtype).float().requires_grad_(x.requires_grad) for name, x in tensors.items()
        }
    compare_grads(
        tensors, runner("chunk", causal, chunk_size=16, eps=eps), runner("reference", causal, eps=eps), dtype
    )


@pytest.mark.parametrize("T", [1, 65])
def test_recurrent_matches_chunk(T):
    tensors = make_inputs(2, T, 2, 12, V=20)
    compare_grads(tensors, runner("recurrent"), runner("chunk", chunk_size=16), torch.float32)


def official(q, k, v, causal, eps=1e-6):
    """The official Flow-Attention equations, written out on (B, H, T, D) in float64 as its code orders them
    (the causal value normalisation as its language-model version: q times the raw incoming flow)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    T = q.shape[2]
    if not causal:
        incoming = 1 / torch.einsum("bhtd,bhd->bht", q + eps, k.sum(2) + eps)
        outgoing = 1 / torch.einsum("bhtd,bhd->bht", k + eps, q.sum(2) + eps)
        sink = torch.einsum("bhtd,bhd->bht", q + eps, (k * outgoing[..., None]).sum(2) + eps)
        source = torch.einsum("bhtd,bhd->bht", k + eps, (q * incoming[..., None]).sum(2) + eps).clamp(-1, 1)
        competition = torch.softmax(source, dim=-1) * T
        kv = torch.einsum("bhtd,bhtm->bhdm", k, v * competition[..., None])
        o = torch.einsum("bhtd,bhdm->bhtm", q * incoming[..., None], kv) * torch.sigmoid(sink)[..., None]
        return o.transpose(1, 2)
    n = torch.arange(1, T + 1, dtype=torch.float64)
    raw_incoming = 1 / torch.einsum("bhtd,bhtd->bht", q + eps, k.cumsum(2) + eps)
    incoming = raw_incoming * n
    outgoing = n / torch.einsum("bhtd,bhtd->bht", k + eps, q.cumsum(2) + eps)
    sink = torch.einsum("bhtd,bhtd->bht", q + eps, (k * outgoing[..., None]).cumsum(2) + eps) / n
    source = (torch.einsum("bhtd,bhtd->bht", k + eps, (q * incoming[..., None]).cumsum(2) + eps) / n).clamp(
        -1, 1
    )
    competition = source.exp() / source.exp().cumsum(-1) * n
    kv = torch.einsum("bhtd,bhtm->bhtdm", k, v * competition[..., None]).cumsum(2)
    o = torch.einsum("bhtd,bhtdm->bhtm", q * raw_incoming[..., None], kv) * torch.sigmoid(sink)[..., None]
    return o.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_matches_official_equations(backend, causal):
    t = detached(make_inputs(2, 40, 3, 16, state=False))
    o, _ = flow(t["q"], t["k"], t["v"], causal=causal, backend=backend, chunk_size=16)
    assert_close("o", o.double(), official(t["q"], t["k"], t["v"], causal), torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_equals_separate(causal):
    t = detached(make_inputs(1, 40, 2, 8, state=False))
    cu = torch.tensor([0, 5, 6, 40], dtype=torch.int32)
    h0 = None
    if causal:  # one state per sequence
        _, h0 = flow(*(torch.randn(3, 4, 2, 8) for _ in range(3)), output_final_state=True)
    o, state = flow(
        t["q"], t["k"], t["v"], causal=causal, initial_state=h0, output_final_state=causal, cu_seqlens=cu
    )
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = flow(
            t["q"][:, a:b],
            t["k"][:, a:b],
            t["v"][:, a:b],
            causal=causal,
            initial_state=None if h0 is None else h0.select(i, i + 1),
            output_final_state=causal,
        )
        assert_close(f"o[{i}]", o[:, a:b], o_i)
        for name, x, y in zip(FIELDS, state.select(i, i + 1) if causal else (), s_i or ()):
            assert_close(f"state[{i}].{name}", x, y)


def test_state_carried_over_two_calls():
    t = detached(make_inputs(2, 50, 2, 8))
    h0 = state_of(t)
    o, s = flow(t["q"], t["k"], t["v"], initial_state=h0, output_final_state=True)
    o1, s1 = flow(t["q"][:, :21], t["k"][:, :21], t["v"][:, :21], initial_state=h0, output_final_state=True)
    o2, s2 = flow(t["q"][:, 21:], t["k"][:, 21:], t["v"][:, 21:], initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o)
    for name, x, y in zip(FIELDS, s2, s):
        assert_close(f"state.{name}", x, y)
    assert (s.count == 7 + 50).all()


@pytest.mark.parametrize("backend", ["reference", "chunk", "recurrent"])
def test_causal_does_not_look_ahead(backend):
    t = detached(make_inputs(1, 30, 2, 8, state=False))
    o1, _ = flow(t["q"], t["k"], t["v"], backend=backend)
    q2, k2, v2 = t["q"].clone(), t["k"].clone(), t["v"].clone()
    for x in (q2, k2, v2):
        x[:, 17:] += torch.randn_like(x[:, 17:])
    o2, _ = flow(q2, k2, v2, backend=backend)
    torch.testing.assert_close(o1[:, :17], o2[:, :17])
    assert (o1[:, 17:] - o2[:, 17:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_bidirectional_sees_everything(backend):
    t = detached(make_inputs(1, 30, 2, 8, state=False))
    o1, _ = flow(t["q"], t["k"], t["v"], causal=False, backend=backend)
    q2 = t["q"].clone()
    q2[:, -1] += 1.0  # a sink far away changes every source's conserved flow, hence every output
    o2, _ = flow(q2, t["k"], t["v"], causal=False, backend=backend)
    assert ((o1 - o2).abs().amax(dim=(2, 3)) > 1e-6).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_matrix_reproduces_output(causal):
    t = detached(make_inputs(2, 20, 3, 8, state=False))
    P, allocation, competition = flow_attention_matrix(t["q"], t["k"], causal=causal)
    o = torch.einsum("bhts,bshv->bthv", P, t["v"])
    expected, _ = flow(t["q"], t["k"], t["v"], causal=causal)
    assert_close("o", o, expected)
    assert ((allocation > 0) & (allocation < 1)).all() and (competition > 0).all()
    if not causal:  # competition is a softmax over the sources times their number
        torch.testing.assert_close(competition.sum(1), torch.full_like(competition.sum(1), 20.0))
    else:
        assert (P.triu(1) == 0).all()


def test_long_sequence_is_finite():
    q, k, v = (torch.randn(1, 16384, 1, 16) for _ in range(3))
    o, state = flow(q, k, v, output_final_state=True)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in state)


def test_bad_inputs():
    q = k = v = torch.randn(2, 8, 2, 4)
    _, h0 = flow(q, k, v, output_final_state=True)
    with pytest.raises(TypeError, match="v has dtype"):
        flow(q, k, v.double())
    with pytest.raises(ValueError, match="meta"):
        flow(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="same length T"):
        flow(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="batch size must be 1"):
        flow(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        flow(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"initial_state.kv must have shape \(3, 2, 4, 4\)"):
        flow(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 2, 5, 8]), initial_state=h0)
    with pytest.raises(TypeError, match="initial_state must be a FlowState"):
        flow(q, k, v, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="bidirectional.*initial_state must be None"):
        flow(q, k, v, causal=False, initial_state=h0)
    with pytest.raises(ValueError, match="bidirectional.*output_final_state=False"):
        flow(q, k, v, causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="recurrent.*causal"):
        flow(q, k, v, causal=False, backend="recurrent")
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        flow(q, k, v, eps=-1.0)


def test_mixer_internals_and_bidirectional():
    x = torch.randn(2, 12, 32)
    mixer = gatelab.make_mixer("flow", d_model=32, n_heads=2, causal=False)
    y, state, internals = mixer(x, return_internals=True)
    assert (
        state is None and internals["gate"].shape == (2, 12, 2) and internals["attn"].shape == (2, 2, 12, 12)
    )
    attn_out = torch.einsum("bhts,bshd->bthd", internals["attn"], mixer.v_proj(x).view(2, 12, 2, 16))
    assert_close("attn", mixer.o_proj(attn_out.reshape(2, 12, 32)), y)
