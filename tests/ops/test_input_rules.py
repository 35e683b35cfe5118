"""Rules every op follows at its edges, from one table of ops: an empty batch gives an empty output of the
right shape, zero heads is refused, a non-finite future token never reaches an earlier output (it is
refused), the scale is a finite number > 0, closed gates (finfo.min log decays) and a chunk_size far past T
give the reference's result."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import check_chunk_matches_reference

from gatelab import ops
from gatelab.ops.common.chunk import chunk_length
from gatelab.testing import assert_close

D = 8  # head dim of every case


@dataclass(frozen=True)
class Op:
    """call(q, k, v, **options) runs the op with inputs made from (B, T, H, D) q, k, v (any extra input is
    built from their shapes); ``shape`` gives q's shape for (B, T, H); linear ops also return a state."""

    call: Callable
    backends: tuple[str, ...]
    causal: bool = True
    linear: bool = False
    shape: Callable = lambda B, T, H: (B, T, H, D)


def _grid(B, T, H):
    return (B, 4, 4, H, D)  # biformer's (B, Hh, Ww, H, D) map, 2 x 2 regions


OPS = {
    "softmax": Op(lambda q, k, v, **o: ops.softmax(q, k, v, **o), ("reference", "sdpa")),
    "sliding_window": Op(
        lambda q, k, v, **o: ops.sliding_window(q, k, v, window=3, **o), ("reference", "sdpa", "flex")
    ),
    "gated_softmax": Op(
        lambda q, k, v, **o: ops.gated_softmax(q, k, v, torch.zeros_like(q), **o), ("reference", "sdpa")
    ),
    "clipped_softmax": Op(
        lambda q, k, v, **o: ops.clipped_softmax(q, k, v, zeta=1.05, gamma=-0.05, **o), ("reference", "chunk")
    ),
    "hip": Op(
        lambda q, k, v, **o: ops.hip(q, k, v, topk=1, block_size_k=2, sinks=1, window=1, **o),
        ("reference", "flex"),
    ),
    "psa": Op(lambda q, k, v, **o: ops.psa(q, k, v, block_size_k=8, **o), ("reference", "flex")),
    "neighborhood": Op(
        lambda q, k, v, **o: ops.neighborhood(q, k, v, kernel_size=3, causal=True, **o),
        ("reference", "sdpa", "flex"),
    ),
    "biformer": Op(
        lambda q, k, v, **o: ops.biformer(q, k, v, regions=2, topk=2, **o),
        ("reference", "flex"),
        False,
        shape=_grid,
    ),
    "gla": Op(
        lambda q, k, v, **o: ops.gla(q, k, v, torch.full_like(k, -0.1), **o),
        ("reference", "chunk", "recurrent"),
        linear=True,
    ),
    "lightning": Op(
        lambda q, k, v, **o: ops.lightning(q, k, v, torch.full(q.shape[2:3], -0.1), **o),
        ("reference", "chunk", "recurrent"),
        linear=True,
    ),
    "gated_deltanet": Op(
        lambda q, k, v, **o: ops.gated_deltanet(
            q, F.normalize(k, dim=-1), v, torch.full(q.shape[:3], -0.1), torch.full(q.shape[:3], 0.5), **o
        ),
        ("reference", "chunk", "recurrent"),
        linear=True,
    ),
    "lina": Op(lambda q, k, v, **o: ops.lina(q, k, v, **o), ("reference", "chunk", "recurrent"), linear=True),
    "flow": Op(lambda q, k, v, **o: ops.flow(q, k, v, **o), ("reference", "chunk", "recurrent"), linear=True),
}
CAUSAL = [name for name, op in OPS.items() if op.causal]
WITH_SCALE = [name for name in OPS if name not in ("lina", "flow")]  # the ops that take a scale
CASES = [(name, backend) for name, op in OPS.items() for backend in op.backends]


def inputs(op: Op, B: int, T: int = 6, H: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(op.shape(B, T, H), generator=gen) for name in "qkv"}


def run(op: Op, x: dict, backend: str, **options):
    """The op's output (its state too for a linear op); flex under no_grad: it has no backward on CPU."""
    with torch.no_grad() if backend == "flex" else torch.enable_grad():
        out = op.call(x["q"], x["k"], x["v"], backend=backend, **options)
    return out if op.linear else (out, None)


@pytest.mark.parametrize("name, backend", CASES)
def test_empty_batch_gives_an_empty_output(name, backend):
    """B = 0 is an empty batch, as torch's own attention accepts: an output (0, ...) of the right shape
    (and an empty final state), with a backward where the backend has one."""
    op = OPS[name]
    x = {n: t.requires_grad_(backend != "flex") for n, t in inputs(op, B=0).items()}
    o, state = run(op, x, backend, **({"output_final_state": True} if op.linear else {}))
    assert o.shape == x["v"].shape and o.dtype == x["q"].dtype
    if op.linear:
        state = state[0] if isinstance(state, tuple) else state  # flow's FlowState: its kv sums
        assert state.shape[:2] == (0, x["q"].shape[2])
    if backend != "flex":
        o.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in x.values())


@pytest.mark.parametrize("name", OPS)
def test_zero_heads_are_refused(name):
    """Heads are a model dimension: H = 0 is a configuration error, refused with the reason."""
    op = OPS[name]
    x = inputs(op, B=2, H=0)
    with pytest.raises(ValueError, match=r"at least one head \(H >= 1\)"):
        op.call(x["q"], x["k"], x["v"], backend="reference")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name, backend", [case for case in CASES if case[0] in CAUSAL])
def test_non_finite_future_token_never_reaches_earlier_outputs(name, backend, value):
    """A non-finite key or value (flow: query too) in the last token is refused, on every backend: the
    matmul paths would carry it into every earlier output as 0 * NaN. A non-finite query elsewhere reaches
    only its own output."""
    op = OPS[name]
    future = ("q", "k", "v") if name == "flow" else ("k", "v")
    for tensor in future:
        x = inputs(op, B=2)
        x[tensor][:, -1] = value
        with pytest.raises(ValueError, match=f"{name}: {tensor} must be finite"):
            run(op, x, backend)
    if name != "flow":
        x = inputs(op, B=2)
        x["q"][:, -1] = value
        o, _ = run(op, x, backend)
        assert torch.isfinite(o[:, :-1]).all()


def test_decoding_step_does_not_read_the_cache():
    """One query at the end of the keys has no future: the check reads nothing, so a decoding step pays
    nothing, and a non-finite past key is the caller's (it reaches the output, as it should)."""
    q, k, v = torch.randn(1, 1, 2, D), torch.randn(1, 9, 2, D), torch.randn(1, 9, 2, D)
    k[:, 3] = float("nan")
    assert torch.isnan(ops.softmax(q, k, v)).all()


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")], ids=["0", "-0.5", "nan", "inf"])
@pytest.mark.parametrize("name", WITH_SCALE)
def test_scale_must_be_finite_and_positive(name, scale):
    """scale is a temperature: 0 and negative values have no use here and SDPA/flex mask before they scale
    (-inf * 0 = NaN), so every op refuses them, and NaN/inf, before any backend runs."""
    op = OPS[name]
    x = inputs(op, B=1)
    for backend in op.backends:
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            run(op, x, backend, scale=scale)
    with pytest.raises(TypeError, match="scale must be a real number"):
        run(op, x, "reference", scale="0.5")


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("clipped_softmax", {"zeta": float("nan")}, "zeta must be a number >= 1"),
        ("clipped_softmax", {"zeta": float("inf")}, "zeta must be a number >= 1"),
        ("clipped_softmax", {"gamma": float("nan")}, "gamma must be a number <= 0"),
        ("clipped_softmax", {"gamma": float("-inf")}, "gamma must be a number <= 0"),
        ("lina", {"eps": float("nan")}, "eps must be a number >= 0"),
        ("flow", {"eps": float("inf")}, "eps must be a number >= 0"),
        ("psa", {"budget": (float("nan"), 0.1, 0.1, 0.1)}, "budget fractions must be numbers >= 0"),
    ],
)
def test_non_finite_options_are_refused(name, options, message):
    """NaN fails every comparison, so a check written as ``value < low`` let it through."""
    q, k, v = inputs(OPS[name], B=1).values()
    call = {
        "clipped_softmax": lambda **o: ops.clipped_softmax(q, k, v, **{"zeta": 1.0, "gamma": 0.0, **o}),
        "lina": lambda **o: ops.lina(q, k, v, **o),
        "flow": lambda **o: ops.flow(q, k, v, **o),
        "psa": lambda **o: ops.psa(q, k, v, block_size_k=8, **o),
    }[name]
    with pytest.raises(ValueError, match=message):
        call(**options)


# Closed gates and long chunks (gla, lightning: the chunked forms whose within-chunk cumulative log decay is
# a difference of sums) --------------------------------------------------------------------------------------

CLOSED = {
    "isolated": [3, 17, 18, 40, 64, 65, 99],  # single and adjacent closed tokens, at chunk edges
    "every_other": list(range(0, 100, 2)),
    "all": list(range(100)),
    "runs": list(range(10, 40)) + list(range(70, 75)),
}


def _decaying_inputs(name: str, closed: list[int], B=2, T=100, H=2, K=16, V=8):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, h0 = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    if name == "gla":
        gate = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 2) / 4
    else:
        gate = -torch.rand(B, T, H, generator=gen) / 2
    gate[:, closed] = torch.finfo(torch.float32).min  # a closed gate: exp() of it is exactly 0
    return dict(q=q, k=k, v=v, g=gate, h0=h0)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("pattern", CLOSED)
@pytest.mark.parametrize("name", ["gla", "lightning"])
def test_closed_gates_match_reference(name, pattern, chunk_size):
    """finfo(float32).min log decays: the chunk form gives the reference's output, final state and every
    gradient (two of them in a chunk made the cumulative sum -inf, and -inf - -inf is NaN)."""
    inputs_ = _decaying_inputs(name, CLOSED[pattern])
    check_chunk_matches_reference(getattr(ops, name), inputs_, chunk_size, torch.float32)


@pytest.mark.parametrize("name", ["gla", "lightning"])
def test_chunk_size_past_T_is_clamped(name):
    """chunk_size=10**6 at T=50 runs one chunk of 64 tokens (it tried to allocate ~16 TB) and gives the
    reference's result."""
    x = _decaying_inputs(name, [], T=50)
    args = (x["q"], x["k"], x["v"], x["g"])
    o, s = getattr(ops, name)(
        *args, initial_state=x["h0"], output_final_state=True, chunk_size=10**6, backend="chunk"
    )
    o_ref, s_ref = getattr(ops, name)(
        *args, initial_state=x["h0"], output_final_state=True, backend="reference"
    )
    assert_close("o", o, o_ref)
    assert_close("state", s, s_ref)


def test_chunk_length():
    assert chunk_length(10**6, 50) == 64  # T rounded up to a power of two
    assert chunk_length(64, 1000) == 64
    assert chunk_length(32, 20) == 32  # power-of-two chunk sizes never change
    assert chunk_length(48, 20) == 32
    assert chunk_length(7, 1) == 1


@pytest.mark.parametrize("name", OPS)
def test_zero_head_dim_is_refused(name):
    """A head dim is a model dimension like H: D = 0 is refused with the reason (D ** -0.5 is undefined)."""
    op = OPS[name]
    x = {n: t[..., :0] for n, t in inputs(op, B=2).items()}
    with pytest.raises(ValueError, match=r"head dims must be >= 1"):
        op.call(x["q"], x["k"], x["v"], backend="reference")
