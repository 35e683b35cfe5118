"""lina: chunk and recurrent against the dense fp32 reference (outputs, final state, every gradient), packed
sequences, carried state, causality, the bidirectional form, LINA's published formula, and input errors."""

import pytest
import torch
from helpers import detached

import gatelab
from gatelab.ops import lina
from gatelab.ops.lina import lina_attention_matrix, lina_features, phi
from gatelab.testing import assert_close, compare_grads


def make_inputs(B, T, H, D, V=None, state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = V or D
    rand = lambda *shape: torch.randn(*shape, generator=g)
    tensors = {
        "q": rand(B, T, H, D),
        "k": rand(B, T, H, D),
        "v": rand(B, T, H, V),
        "key_gate": 0.5 + torch.rand(B, T, H, generator=g),  # around LINA's init of 1
        "value_gate": 0.5 + torch.rand(B, T, H, generator=g),
    }
    if state:  # a plausible state: non-negative key sums, as after a prefix
        fk = phi(rand(B, 7, H, D), "relu")
        vv = torch.cat([rand(B, 7, H, V), torch.ones(B, 7, H, 1)], dim=-1)
        tensors["initial_state"] = torch.einsum("bthk,bthv->bhkv", fk, vv)
    return {name: t.requires_grad_() for name, t in tensors.items()}


def runner(backend, causal=True, **options):
    def run(t):
        return lina(
            t["q"],
            t["k"],
            t["v"],
            key_gate=t["key_gate"],
            value_gate=t["value_gate"],
            causal=causal,
            initial_state=t.get("initial_state"),
            output_final_state=causal,
            backend=backend,
            **options,
        )

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [1, 63, 65])
def test_chunk_matches_reference(T, causal, dtype):
    tensors = make_inputs(3, T, 2, 60, state=causal)
    # One token without a state: o = v up to eps, so dq and dkey_gate are pure eps terms that any change of
    # summation order drowns (cancellation); a large eps makes them real.
    eps = 1.0 if T == 1 and not causal else 1e-6
    compare_grads(
        tensors, runner("chunk", causal, chunk_size=16, eps=eps), runner("reference", causal, eps=eps), dtype
    )


@pytest.mark.parametrize("T", [1, 65])
def test_recurrent_matches_chunk(T):
    tensors = make_inputs(2, T, 2, 12, V=20)
    compare_grads(tensors, runner("recurrent"), runner("chunk", chunk_size=16), torch.float32)


@pytest.mark.parametrize("feature_map", ["elu", "identity"])
def test_feature_maps(feature_map):
    tensors = make_inputs(2, 33, 2, 8)
    if feature_map == "identity":  # the caller's features must be non-negative
        tensors["q"].data.abs_(), tensors["k"].data.abs_()
    options = {"feature_map": feature_map}
    compare_grads(
        tensors, runner("chunk", chunk_size=8, **options), runner("reference", **options), torch.float32
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_equals_separate(causal):
    t = make_inputs(1, 40, 2, 8, state=False)
    cu = torch.tensor([0, 5, 6, 40], dtype=torch.int32)
    h0 = torch.rand(3, 2, 8, 9) if causal else None
    args = (t["q"], t["k"], t["v"])
    gates = dict(key_gate=t["key_gate"], value_gate=t["value_gate"])
    o, state = lina(*args, **gates, causal=causal, initial_state=h0, output_final_state=causal, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = lambda x, a=a, b=b: x[:, a:b]
        o_i, s_i = lina(
            *map(piece, args),
            key_gate=piece(gates["key_gate"]),
            value_gate=piece(gates["value_gate"]),
            causal=causal,
            initial_state=None if h0 is None else h0[i : i + 1],
            output_final_state=causal,
        )
        assert_close(f"o[{i}]", o[:, a:b], o_i)
        if causal:
            assert_close(f"state[{i}]", state[i : i + 1], s_i)


def test_state_carried_over_two_calls():
    t = make_inputs(2, 50, 2, 8)
    args = lambda a, b: (t["q"][:, a:b], t["k"][:, a:b], t["v"][:, a:b])
    gates = lambda a, b: dict(key_gate=t["key_gate"][:, a:b], value_gate=t["value_gate"][:, a:b])
    h0 = t["initial_state"]
    o, s = lina(*args(0, 50), **gates(0, 50), initial_state=h0, output_final_state=True)
    o1, s1 = lina(*args(0, 21), **gates(0, 21), initial_state=h0, output_final_state=True)
    o2, s2 = lina(*args(21, 50), **gates(21, 50), initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o)
    assert_close("state", s2, s)


@pytest.mark.parametrize("backend", ["reference", "chunk", "recurrent"])
def test_causal_does_not_look_ahead(backend):
    t = detached(make_inputs(1, 30, 2, 8, state=False))
    o1, _ = lina(t["q"], t["k"], t["v"], key_gate=t["key_gate"], value_gate=t["value_gate"], backend=backend)
    k2, v2 = t["k"].clone(), t["v"].clone()
    k2[:, 17:] += torch.randn_like(k2[:, 17:])
    v2[:, 17:] += 1.0
    o2, _ = lina(t["q"], k2, v2, key_gate=t["key_gate"], value_gate=t["value_gate"], backend=backend)
    torch.testing.assert_close(o1[:, :17], o2[:, :17])
    assert (o1[:, 17:] - o2[:, 17:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_bidirectional_sees_everything(backend):
    t = detached(make_inputs(1, 30, 2, 8, state=False))
    o1, _ = lina(t["q"], t["k"], t["v"], causal=False, backend=backend)
    v2 = t["v"].clone()
    v2[:, -1] += 1.0
    o2, _ = lina(t["q"], t["k"], v2, causal=False, backend=backend)
    assert ((o1 - o2).abs().amax(dim=(2, 3)) > 1e-4).all()  # every position sees the last token


def test_matches_lina_published_form():
    """LINA's code: o = phi(q) (phi(K)^T V / N) / (phi(q) mean(phi(K)) + 1e-6) = ours with eps = N * 1e-6."""
    t = detached(make_inputs(2, 20, 3, 8, state=False))
    fq, fk = phi(t["q"], "relu"), phi(t["k"], "relu") * t["key_gate"][..., None]
    fv = t["v"] * t["value_gate"][..., None]
    N = 20
    kv = torch.einsum("bnhk,bnhv->bhkv", fk * N**-0.5, fv * N**-0.5)
    z = 1 / (torch.einsum("bnhk,bhk->bnh", fq, fk.mean(dim=1)) + 1e-6)
    expected = torch.einsum("bnhk,bhkv->bnhv", fq, kv) * z[..., None]
    o, _ = lina(
        t["q"], t["k"], t["v"], key_gate=t["key_gate"], value_gate=t["value_gate"], causal=False, eps=N * 1e-6
    )
    assert_close("o", o, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matrix_reproduces_output(causal):
    t = detached(make_inputs(2, 20, 3, 8, state=False))
    P = lina_attention_matrix(t["q"], t["k"], t["key_gate"], causal=causal)  # (B, H, T, T)
    o = torch.einsum("bhts,bshv->bthv", P, t["v"] * t["value_gate"][..., None])
    expected, _ = lina(
        t["q"], t["k"], t["v"], key_gate=t["key_gate"], value_gate=t["value_gate"], causal=causal
    )
    assert_close("o", o, expected)
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)), rtol=0, atol=1e-4)  # normalised rows
    if causal:
        assert (P.triu(1) == 0).all()


def test_long_sequence_is_finite():
    q, k, v = (torch.randn(1, 16384, 1, 16) for _ in range(3))
    gate = torch.full((1, 16384, 1), 1e-3)  # near-closed gates: tiny weights, the normaliser keeps o bounded
    o, state = lina(q, k, v, key_gate=gate, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert o.abs().max() <= v.abs().max() * 1.001  # a convex combination of the values


def test_ones_column_layout():
    """The state's last column is z = sum g phi(k): o divides the first V columns by q . z."""
    t = detached(make_inputs(1, 9, 1, 4, state=False))
    _, state = lina(t["q"], t["k"], t["v"], key_gate=t["key_gate"], output_final_state=True)
    fq, fk, _ = lina_features(t["q"], t["k"], t["v"], t["key_gate"], t["value_gate"], "relu")
    assert_close("z", state[..., -1], fk.sum(1))


def test_bad_inputs():
    q = k = v = torch.randn(2, 8, 2, 4)
    with pytest.raises(ValueError, match="key_gate must have shape"):
        lina(q, k, v, key_gate=torch.ones(2, 8, 3))
    with pytest.raises(ValueError, match="value_gate must be finite"):
        lina(q, k, v, value_gate=torch.full((2, 8, 2), float("inf")))
    with pytest.raises(TypeError, match="key_gate has dtype"):
        lina(q, k, v, key_gate=torch.ones(2, 8, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="v has dtype"):
        lina(q, k, v.double())
    with pytest.raises(ValueError, match="meta"):
        lina(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="batch size must be 1"):
        lina(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        lina(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="one state per sequence|B or N"):
        lina(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 5, 8]), initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B or N, H, K, V\+1\)"):
        lina(q, k, v, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="bidirectional.*initial_state must be None"):
        lina(q, k, v, causal=False, initial_state=torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="bidirectional.*output_final_state=False"):
        lina(q, k, v, causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="recurrent.*causal"):
        lina(q, k, v, causal=False, backend="recurrent")
    with pytest.raises(ValueError, match="unknown backend 'flex'"):
        lina(q, k, v, backend="flex")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        lina(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        lina(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lina(q, k, v, chunk_size=0)


def test_mixer_gates_and_limits():
    x = torch.randn(2, 12, 32)
    for gate in ("kv", "input", "none"):
        mixer = gatelab.make_mixer("lina", d_model=32, n_heads=2, gate=gate, max_len=16)
        y, state, internals = mixer(x, return_internals=True)
        assert internals["gate"].shape == (2, 12, 2, 2) and internals["attn"].shape == (2, 2, 12, 12)
        attn_out = torch.einsum("bhts,bshd->bthd", internals["attn"], mixer.v_proj(x).view(2, 12, 2, 16))
        assert_close(f"{gate} attn", mixer.o_proj(attn_out.reshape(2, 12, 32)), y)
        assert state.state.shape == (2, 2, 16, 17) and state.length == 12
        with torch.no_grad():  # prefill then token by token == one pass, for every gate
            y_prefix, state = mixer(x[:, :5])
            steps = [y_prefix]
            for t in range(5, 12):
                y_t, state = mixer(x[:, t : t + 1], state=state)
                steps.append(y_t)
        assert_close(f"{gate} decode", torch.cat(steps, dim=1), y.detach())
    with pytest.raises(ValueError, match="max_len=16"):
        mixer = gatelab.make_mixer("lina", d_model=32, n_heads=2, max_len=16)
        _, state = mixer(x)
        mixer(x, state=state)
    with pytest.raises(ValueError, match="gate must be one of"):
        gatelab.make_mixer("lina", d_model=32, n_heads=2, gate="forget")
