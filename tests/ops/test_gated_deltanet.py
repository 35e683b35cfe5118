"""Gated DeltaNet: every backend against the fp32 token-loop reference, states, packing, causality,
strong decay, bad inputs; the short causal convolution; the mixer's gates and internals."""

import pytest
import torch
import torch.nn.functional as F
from helpers import detached

import gatelab
from gatelab.ops import gated_deltanet
from gatelab.ops.common.short_conv import short_conv
from gatelab.ops.gated_deltanet import (
    gated_deltanet_attention_matrix,
    gated_deltanet_reference,
    gated_deltanet_step,
    l2_normalize,
)
from gatelab.testing import assert_close, compare_grads, nan_poison


def make_inputs(B, T, H, K, V, *, decay=1.0, seed=0, initial_state=True):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    return {
        "q": rand(B, T, H, K).requires_grad_(),
        "k": l2_normalize(rand(B, T, H, K)).requires_grad_(),  # the rule assumes unit-norm keys
        "v": rand(B, T, H, V).requires_grad_(),
        "g": (-decay * F.softplus(rand(B, T, H))).requires_grad_(),  # log decay <= 0
        "beta": torch.sigmoid(rand(B, T, H)).requires_grad_(),
        "h0": rand(B, H, K, V).requires_grad_() if initial_state else None,
    }


def run(backend, **options):
    def fn(x):
        return gated_deltanet(
            x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True,
            backend=backend, **options,
        )  # fmt: skip

    return fn


SHAPES = [  # B, T, H, K, V, chunk_size
    (3, 1, 2, 16, 16, 64),
    (2, 63, 2, 60, 32, 64),
    (1, 65, 2, 60, 60, 64),
    (2, 65, 1, 16, 24, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}-C{}".format(*s))
def test_chunk_matches_reference(shape, dtype):
    B, T, H, K, V, chunk_size = shape
    compare_grads(make_inputs(B, T, H, K, V), run("chunk", chunk_size=chunk_size), run("reference"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recurrent_matches_reference(dtype):
    compare_grads(make_inputs(2, 33, 2, 16, 24), run("recurrent"), run("reference"), dtype)


def test_chunk_equals_token_by_token_decode():
    x = make_inputs(2, 40, 2, 16, 24)
    o_chunk, s_chunk = run("chunk", chunk_size=16)(x)
    with torch.no_grad():
        state, steps = x["h0"].float(), []
        for t in range(40):
            args = [x[n][:, t].float() for n in ("q", "k", "v", "g", "beta")]
            args[0] = args[0] * 16**-0.5  # the step takes a scaled query
            o_t, state = gated_deltanet_step(*args, state)
            steps.append(o_t)
    assert_close("decode o", torch.stack(steps, dim=1), o_chunk.detach(), torch.float32)
    assert_close("decode state", state, s_chunk.detach(), torch.float32)


def test_state_over_two_calls_equals_one_call():
    x = make_inputs(2, 100, 2, 16, 24)
    o_full, s_full = gated_deltanet(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    parts, state = [], x["h0"]
    for sl in (slice(0, 37), slice(37, 100)):  # a cut inside a chunk
        o, state = gated_deltanet(
            *(x[n][:, sl] for n in ("q", "k", "v", "g", "beta")), initial_state=state, output_final_state=True
        )
        parts.append(o)
    assert_close("two calls o", torch.cat(parts, dim=1), o_full, torch.float32)
    assert_close("two calls state", state, s_full, torch.float32)


@pytest.mark.parametrize("backend", ["chunk", "reference"])
def test_packed_equals_separate(backend):
    bounds = [0, 5, 70, 100]
    x = make_inputs(1, 100, 2, 16, 24, initial_state=False)
    h0 = torch.randn(3, 2, 16, 24)
    names = ("q", "k", "v", "g", "beta")
    cu = torch.tensor(bounds, dtype=torch.int32)
    o, s = gated_deltanet(
        *(x[n] for n in names), initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend
    )
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_i, s_i = gated_deltanet_reference(
            *(x[n][:, a:b] for n in names), initial_state=h0[i : i + 1], output_final_state=True
        )
        assert_close(f"sequence {i} o", o[:, a:b], o_i, torch.float32)
        assert_close(f"sequence {i} state", s[i : i + 1], s_i, torch.float32)


def test_no_lookahead():
    x = detached(make_inputs(2, 50, 2, 16, 24))
    y = {n: t.clone() for n, t in x.items()}
    for n in ("q", "k", "v", "g", "beta"):
        y[n][:, 21:] = (
            torch.rand_like(y[n][:, 21:]) * 0.5 - 0.6 if n == "g" else torch.rand_like(y[n][:, 21:])
        )
    o1, _ = run("chunk", chunk_size=16)(x)
    o2, _ = run("chunk", chunk_size=16)(y)
    torch.testing.assert_close(o1[:, :21], o2[:, :21], rtol=0, atol=0)
    assert (o1[:, 21:] - o2[:, 21:]).abs().max() > 1e-3


def test_strong_decay_long_sequence_is_finite_and_forgets():
    """alpha = e^-60 ~ 1e-26: the state holds only the current token, o_t = scale (q_t . k_t) beta_t v_t."""
    x = make_inputs(1, 16384, 1, 8, 8, initial_state=False)
    g = torch.full((1, 16384, 1), -60.0, requires_grad=True)
    o, s = gated_deltanet(x["q"], x["k"], x["v"], g, x["beta"], output_final_state=True, backend="chunk")
    expected = 8**-0.5 * (x["q"] * x["k"]).sum(-1, keepdim=True) * x["beta"][..., None] * x["v"]
    assert_close("forgetful o", o, expected.detach(), torch.float32)
    (o.square().sum() + s.sum()).backward()
    for name, grad in (("q", x["q"].grad), ("k", x["k"].grad), ("v", x["v"].grad), ("g", g.grad)):
        assert torch.isfinite(grad).all(), f"d{name} not finite"


def test_extreme_decay_mixture_matches_reference():
    # decays from ~0 to -1e4 in one chunk: cumulative sums reach -1e5 and must not swamp the small ones
    x = make_inputs(1, 130, 2, 16, 16)
    mix = torch.tensor([0.0, -1e-3, -0.5, -30.0, -1e4])
    g = mix[torch.randint(0, 5, (1, 130, 2))].requires_grad_()
    compare_grads({**x, "g": g}, run("chunk"), run("reference"), torch.float32)


def test_attention_matrix_reproduces_output():
    x = detached(make_inputs(2, 20, 2, 16, 24, initial_state=False))
    A = gated_deltanet_attention_matrix(x["q"], x["k"], x["g"], x["beta"])  # (B, H, T, T)
    o, _ = gated_deltanet_reference(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert A.shape == (2, 2, 20, 20)
    assert torch.equal(A, A.tril()), "the matrix of a causal recurrence is lower triangular"
    assert_close("A v", torch.einsum("bhts,bshv->bthv", A, x["v"]), o, torch.float32)


def test_qk_l2norm_option_and_scale():
    x = detached(make_inputs(1, 30, 2, 16, 16))
    q, k = x["q"] * 3, x["k"] * 5
    o1, _ = gated_deltanet(q, k, x["v"], x["g"], x["beta"], use_qk_l2norm=True, scale=0.5)
    o2, _ = gated_deltanet_reference(l2_normalize(q), l2_normalize(k), x["v"], x["g"], x["beta"], scale=0.5)
    assert_close("l2norm o", o1, o2, torch.float32)


def test_outputs_fully_written_and_no_state_unless_asked():
    x = detached(make_inputs(1, 70, 2, 16, 16))
    with nan_poison():
        o, s = gated_deltanet(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="chunk")
    assert s is None and torch.isfinite(o).all()


def test_bad_inputs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: triton must be unavailable
    x = detached(make_inputs(2, 10, 2, 8, 8))
    q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
    with pytest.raises(ValueError, match="g is a log decay and must be <= 0"):
        gated_deltanet(q, k, v, g.abs() + 0.1, beta)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        gated_deltanet(q, k, v, g, beta + 1)
    with pytest.raises(ValueError, match="batch size must be 1 when cu_seqlens"):
        gated_deltanet(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        gated_deltanet(
            q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)
        )
    with pytest.raises(TypeError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        gated_deltanet(q, k.bfloat16(), v, g, beta)
    with pytest.raises(TypeError, match="g must have q's dtype"):
        gated_deltanet(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.half(), beta)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        gated_deltanet(q, k, v.to("meta"), g, beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        gated_deltanet(q, k, v, g, beta[:, :5])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, K, V\) = \(2, 2, 8, 8\)"):
        gated_deltanet(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gated_deltanet(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gated_deltanet(q, k, v, g, beta, backend="fast")
    with pytest.raises(RuntimeError, match="'triton' is not available"):
        gated_deltanet(q, k, v, g, beta, backend="triton")


# short causal convolution -------------------------------------------------------------------------


def test_short_conv_definition_and_streaming():
    x, w, b = torch.randn(2, 11, 5), torch.randn(5, 4), torch.randn(5)
    y, _ = short_conv(x, w, b, activation=None)
    padded = F.pad(x, (0, 0, 3, 0))  # three zeros before the first token
    expected = torch.stack([(padded[:, t : t + 4] * w.T).sum(1) + b for t in range(11)], dim=1)
    assert_close("conv", y, expected, torch.float32)
    y_full, s_full = short_conv(x, w, b, output_final_state=True)
    pieces, state = [], None
    for sl in (slice(0, 2), slice(2, 3), slice(3, 11)):  # a piece shorter than the state
        y_i, state = short_conv(x[:, sl], w, b, state=state, output_final_state=True)
        pieces.append(y_i)
    assert_close("streamed conv", torch.cat(pieces, dim=1), y_full, torch.float32)
    assert torch.equal(state, s_full) and torch.equal(s_full, x[:, -3:])
    with pytest.raises(ValueError, match=r"state must have shape \(B, W - 1, C\)"):
        short_conv(x, w, state=torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        short_conv(x, torch.randn(4, 4))


# mixer --------------------------------------------------------------------------------------------


def test_mixer_gates_and_internals():
    mixer = gatelab.make_mixer("gated_deltanet", d_model=32, n_heads=2, chunk_size=8).eval()
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert ((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16)).all()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        y, state, internals = mixer(x, return_internals=True)
    alpha, beta, attn = internals["gate"], internals["beta"], internals["attn"]
    assert alpha.shape == beta.shape == (2, 12, 2) and attn.shape == (2, 2, 12, 12)
    assert ((alpha > 0) & (alpha < 1)).all() and ((beta > 0) & (beta < 1)).all()
    assert torch.equal(attn, attn.tril())
    assert state.state.shape == (2, 2, 16, 32) and state.state.dtype == torch.float32 and state.length == 12
    assert set(state.conv) == {"q", "k", "v"} and state.conv["v"].shape == (2, 3, 64)
    with pytest.raises(TypeError, match="RecurrentState"):
        mixer(x, state=object())
    with pytest.raises(ValueError, match="causal=False is not supported"):
        gatelab.make_mixer("gated_deltanet", d_model=32, n_heads=2, causal=False)


def test_mixer_backends_agree():
    x = torch.randn(2, 19, 32)
    outputs = {}
    for backend in ("chunk", "recurrent", "reference"):
        torch.manual_seed(0)
        mixer = gatelab.make_mixer(
            "gated_deltanet", d_model=32, n_heads=2, chunk_size=8, backend=backend
        ).eval()
        with torch.no_grad():
            outputs[backend] = mixer(x)
    for backend in ("chunk", "recurrent"):
        assert_close(f"mixer {backend}", outputs[backend][0], outputs["reference"][0], torch.float32)
        assert_close(
            f"mixer {backend} state", outputs[backend][1].state, outputs["reference"][1].state, torch.float32
        )
