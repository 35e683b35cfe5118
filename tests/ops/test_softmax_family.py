"""softmax, gated_softmax, clipped_softmax: every fast path against the fp32 reference (output and every
gradient), on awkward shapes, GQA, decode alignment, gate limits and bad input."""

import pytest
import torch

from gatelab import ops
from gatelab.testing import compare_grads, nan_poison

# (B, T, S, H, Hkv, D): one token, odd lengths, D=60, GQA, and T < S (a decode chunk against a cache)
SHAPES = [
    (1, 1, 1, 2, 2, 16),
    (3, 63, 63, 4, 2, 60),
    (2, 65, 65, 4, 4, 32),
    (2, 5, 17, 4, 1, 16),
]
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(B, T, S, H, Hkv, D, gate_dim=None):
    t = {
        "q": torch.randn(B, T, H, D, requires_grad=True),
        "k": torch.randn(B, S, Hkv, D, requires_grad=True),
        "v": torch.randn(B, S, Hkv, D, requires_grad=True),
    }
    if gate_dim is not None:
        t["gate"] = torch.randn(B, T, H, gate_dim, requires_grad=True)
    return t


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_sdpa_matches_reference(shape, dtype, causal):
    t = make_inputs(*shape)
    run = lambda backend: lambda x: ops.softmax(x["q"], x["k"], x["v"], causal=causal, backend=backend)
    with nan_poison():
        compare_grads(t, run("sdpa"), run("reference"), dtype)


@pytest.mark.parametrize("window,sinks", [(4, 0), (7, 2), (1, 1)])
def test_softmax_window_and_sinks(window, sinks):
    t = make_inputs(2, 33, 33, 4, 2, 16)
    run = lambda backend: (
        lambda x: ops.softmax(x["q"], x["k"], x["v"], window=window, sinks=sinks, backend=backend)
    )
    compare_grads(t, run("sdpa"), run("reference"), torch.float32)
    # brute force: query i sees keys j with i - window < j <= i, or j < sinks (and j <= i)
    q, k, v = (t[n].detach() for n in "qkv")
    o = ops.softmax(q, k, v, window=window, sinks=sinks, backend="reference")
    for i in (0, 5, 32):
        visible = [j for j in range(33) if j <= i and (i - j < window or j < sinks)]
        ref = ops.softmax(q[:, i : i + 1], k[:, visible], v[:, visible], causal=False, backend="reference")
        torch.testing.assert_close(o[:, i : i + 1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
def test_gated_softmax_sdpa_matches_reference(shape, dtype, granularity):
    D = shape[-1]
    t = make_inputs(*shape, gate_dim=D if granularity == "elementwise" else 1)
    run = lambda backend: lambda x: ops.gated_softmax(x["q"], x["k"], x["v"], x["gate"], backend=backend)
    with nan_poison():
        compare_grads(t, run("sdpa"), run("reference"), dtype)


@pytest.mark.parametrize("gate_fn", ["sigmoid", "silu", "ns_sigmoid"])
@pytest.mark.parametrize("combine", ["multiply", "add"])
def test_gated_softmax_variants(gate_fn, combine):
    t = make_inputs(2, 17, 17, 4, 2, 16, gate_dim=16)
    run = lambda backend: (
        lambda x: ops.gated_softmax(
            x["q"], x["k"], x["v"], x["gate"], gate_fn=gate_fn, combine=combine, backend=backend
        )
    )
    compare_grads(t, run("sdpa"), run("reference"), torch.float32)
    q, k, v, g = (t[n].detach() for n in ("q", "k", "v", "gate"))
    o = ops.softmax(q, k, v, backend="reference")
    act = {
        "sigmoid": torch.sigmoid,
        "silu": torch.nn.functional.silu,
        "ns_sigmoid": lambda x: 0.5 + 0.5 * torch.sigmoid(x),
    }
    expected = o * act[gate_fn](g) if combine == "multiply" else o + act[gate_fn](g)
    torch.testing.assert_close(ops.gated_softmax(q, k, v, g, gate_fn=gate_fn, combine=combine), expected)


def test_gate_open_is_plain_softmax_and_headwise_is_tied_elementwise():
    q, k, v = torch.randn(2, 19, 4, 16), torch.randn(2, 19, 2, 16), torch.randn(2, 19, 2, 16)
    open_gate = torch.full((2, 19, 4, 1), 40.0)  # sigmoid(40) == 1 in fp32
    torch.testing.assert_close(ops.gated_softmax(q, k, v, open_gate), ops.softmax(q, k, v), rtol=0, atol=0)
    headwise = torch.randn(2, 19, 4, 1)
    torch.testing.assert_close(
        ops.gated_softmax(q, k, v, headwise), ops.gated_softmax(q, k, v, headwise.expand(-1, -1, -1, 16))
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clipped_softmax_chunk_matches_reference(shape, dtype):
    t = make_inputs(*shape)
    run = lambda backend: (
        lambda x: ops.clipped_softmax(x["q"], x["k"], x["v"], zeta=1.02, gamma=-0.03, backend=backend)
    )
    with nan_poison():
        compare_grads(t, run("chunk"), run("reference"), dtype)


def test_clipped_softmax_limits():
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 4, 16), torch.randn(2, 40, 4, 16)
    plain = ops.softmax(q, k, v, backend="reference")
    torch.testing.assert_close(ops.clipped_softmax(q, k, v, zeta=1.0, gamma=0.0), plain)
    from gatelab.ops.clipped_softmax import clipped_probs

    p = clipped_probs(q, k, gamma=-0.1)
    causal_zero = torch.ones(40, 40).triu(1).bool()
    assert (p[..., causal_zero] == 0).all(), "masked keys must stay exactly 0"
    assert (p[..., ~causal_zero] == 0).float().mean() > 0.5, (
        "gamma=-0.1 must zero small probabilities exactly"
    )
    assert p.max() <= 1.0 and p.min() >= 0.0
    big = clipped_probs(q * 10, k, zeta=1.5, gamma=0.0)
    assert (big == 1.0).any(), "zeta > 1 must clip a dominant probability to exactly 1"


@pytest.mark.parametrize("op", ["softmax", "gated_softmax", "clipped_softmax"])
def test_bad_input(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn = getattr(ops, op)
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    extra = (torch.randn(2, 8, 4, 16),) if op == "gated_softmax" else ()
    with pytest.raises(ValueError, match=r"q must have 4 dims"):
        fn(q[0], k, v, *extra)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        fn(torch.randn(2, 8, 3, 16), k, v, *((torch.randn(2, 8, 3, 16),) if extra else ()))
    with pytest.raises(TypeError, match="dtype"):
        fn(q, k.double(), v, *extra)
    with pytest.raises(ValueError, match="device"):
        fn(q, k.to("meta"), v, *extra)
    with pytest.raises(ValueError, match="unknown backend"):
        fn(q, k, v, *extra, backend="cuda-magic")
    with pytest.raises(RuntimeError, match="not available"):
        if op == "gated_softmax":
            fn(q, k, v, *extra, backend="triton")
        else:
            raise RuntimeError("not available")  # only gated_softmax has a triton backend
    with pytest.raises(ValueError, match="at least as many keys"):
        fn(q, k[:, :4], v[:, :4], *extra)


def test_gated_softmax_bad_gate():
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 4, 16), torch.randn(2, 8, 4, 16)
    with pytest.raises(ValueError, match=r"gate must have shape"):
        ops.gated_softmax(q, k, v, torch.randn(2, 8, 4, 5))
    with pytest.raises(ValueError, match="gate_fn"):
        ops.gated_softmax(q, k, v, torch.randn(2, 8, 4, 1), gate_fn="tanh")
    with pytest.raises(ValueError, match="gamma must be"):
        ops.clipped_softmax(q, k, v, gamma=0.1)
    with pytest.raises(ValueError, match="zeta must be"):
        ops.clipped_softmax(q, k, v, zeta=0.9)
