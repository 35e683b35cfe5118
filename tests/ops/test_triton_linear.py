"""The chunked Triton kernels of the linear-attention ops against their fp32 references: output, final
state and every gradient (q, k, v, gates, beta, initial state), fp32 and bf16, awkward shapes, packed
sequences, strong decay. On a GPU when there is one, else under the Triton interpreter at tiny shapes."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, triton_interpreted

from gatelab import ops
from gatelab.ops.common.varlen import run_packed
from gatelab.ops.gated_deltanet.reference import gated_deltanet_reference
from gatelab.ops.gla.reference import gla_reference
from gatelab.ops.lightning.reference import lightning_reference
from gatelab.testing import compare_grads, nan_poison

with triton_interpreted():
    triton = pytest.importorskip(
        "triton", reason="triton is not installed; the Triton kernels cannot be tested"
    )
    from gatelab.ops.gated_deltanet.triton import gated_deltanet_triton
    from gatelab.ops.gla.triton import gla_triton
    from gatelab.ops.lightning.triton import lightning_triton

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]


def _leaf(*shape, fn=None):
    x = torch.randn(*shape, device=DEVICE)
    return (fn(x) if fn else x).requires_grad_()


def _gla_inputs(B, T, H, K, V, with_state=True):
    x = dict(
        q=_leaf(B, T, H, K), k=_leaf(B, T, H, K), v=_leaf(B, T, H, V), g=_leaf(B, T, H, K, fn=F.logsigmoid)
    )
    x["initial_state"] = _leaf(B, H, K, V) if with_state else None
    return x


def case_id(case) -> str:
    """(B, T, H, K, V, chunk, dtype) -> "B1T65H1K60V16c32-float32"."""
    return "B{}T{}H{}K{}V{}c{}-{}".format(*case[:6], str(case[6])[6:])


def _compare(inputs, fast, reference, dtype, **options):
    """fast(**inputs, **options) against the reference, which runs packed sequences (cu_seqlens) one by one
    as the ops' dispatchers do (the PyTorch backends take no cu_seqlens)."""

    def expected(x):
        if "cu_seqlens" not in options:
            return reference(**x, output_final_state=True)
        tensors = tuple(t for name, t in x.items() if name != "initial_state")
        return run_packed(reference, options["cu_seqlens"], tensors, x["initial_state"], True)

    with nan_poison():
        compare_grads(inputs, lambda x: fast(**x, output_final_state=True, **options), expected, dtype)


# (B, T, H, K, V, chunk, dtype): several chunks with a ragged tail and K=60 masked to 64; T=63 in one
# chunk; T=1 with B=3.
GLA_CASES = [
    (1, 65, 1, 60, 16, 32, torch.float32),
    (1, 63, 1, 32, 16, 64, torch.float32),
    (1, 63, 1, 32, 16, 64, torch.bfloat16),
    (3, 1, 1, 16, 16, 64, torch.float32),
    (3, 1, 1, 16, 16, 64, torch.bfloat16),
]


@pytest.mark.parametrize("case", GLA_CASES, ids=case_id)
def test_gla_matches_reference(case):
    B, T, H, K, V, chunk, dtype = case
    _compare(_gla_inputs(B, T, H, K, V), gla_triton, gla_reference, dtype, chunk_size=chunk)


def test_gla_strong_decay_is_finite():
    """alpha = e^-30 per step: every exponential in the kernels stays <= 1, so nothing overflows; outputs,
    state and the gradients of q, k, v and the initial state keep fp32 accuracy. dg is exact only up to
    cancellation (the reverse cumulative sum of q dq - k dk subtracts O(1) terms whose true difference is
    ~e^-30), so it is checked in absolute terms against the size of those terms."""
    x = _gla_inputs(1, 40, 1, 16, 16)
    x["g"] = torch.full((1, 40, 1, 16), -30.0, device=DEVICE).requires_grad_()
    results = []
    for fn in (lambda a: gla_triton(**a, output_final_state=True, chunk_size=32), gla_reference):
        inputs = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
        with nan_poison():
            o, state = fn(inputs) if fn is not gla_reference else fn(**inputs, output_final_state=True)
            (o.sum() + state.sum()).backward()
        results.append((o, state, {name: t.grad for name, t in inputs.items()}))
    (o, state, grads), (o_ref, state_ref, grads_ref) = results
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-4, atol=1e-5)
    for name in ("q", "k", "v", "initial_state"):
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(grads["g"]).all()
    size = (x["q"] * grads_ref["q"]).abs().max()
    assert (grads["g"] - grads_ref["g"]).abs().max() <= 1e-5 * size


def test_gla_closed_gates_match_reference():
    """finfo(float32).min log gates, two in a row inside a chunk: the kernels' within-chunk cumulative sum
    would be -inf and its differences NaN; the floored gate gives the reference's output and gradients."""
    x = _gla_inputs(1, 40, 1, 16, 16)
    g = x["g"].detach().clone()
    g[:, [3, 4, 20, 33]] = torch.finfo(torch.float32).min
    x["g"] = g.requires_grad_()
    _compare(x, gla_triton, gla_reference, torch.float32, chunk_size=32)


def test_gla_packed_sequences():
    """cu_seqlens: each packed sequence starts from its own state, same as running them one by one."""
    x = _gla_inputs(1, 37, 1, 16, 16, with_state=False)
    x["initial_state"] = _leaf(2, 1, 16, 16)
    cu = torch.tensor([0, 12, 37], dtype=torch.int32, device=DEVICE)
    _compare(x, gla_triton, gla_reference, torch.float32, cu_seqlens=cu, chunk_size=16)


@pytest.mark.parametrize("per_token", [False, True], ids=["decay(H)", "decay(B,T,H)"])
def test_lightning_matches_reference(per_token):
    B, T, H, K, V = 2, 21, 2, 16, 16
    x = dict(q=_leaf(B, T, H, K), k=_leaf(B, T, H, K), v=_leaf(B, T, H, V), initial_state=_leaf(B, H, K, V))
    shape = (B, T, H) if per_token else (H,)
    x["decay"] = (-torch.rand(shape, device=DEVICE) - 0.01).requires_grad_()
    _compare(x, lightning_triton, lightning_reference, torch.float32, chunk_size=16)


def test_dispatchers_select_triton():
    x = _gla_inputs(1, 9, 1, 16, 16, with_state=False)
    args = (x["q"], x["k"], x["v"])
    o, _ = ops.gla(*args, x["g"], backend="triton")
    torch.testing.assert_close(o, gla_reference(*args, x["g"])[0], rtol=1e-4, atol=1e-5)
    decay = -torch.rand(1, device=DEVICE)
    o, _ = ops.lightning(*args, decay, backend="triton")
    torch.testing.assert_close(o, lightning_reference(*args, decay)[0], rtol=1e-4, atol=1e-5)


def _gdn_inputs(B, T, H, K, V):
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731 - the delta rule assumes unit-norm keys
    return dict(
        q=_leaf(B, T, H, K), k=_leaf(B, T, H, K, fn=unit), v=_leaf(B, T, H, V),
        g=_leaf(B, T, H, fn=F.logsigmoid), beta=_leaf(B, T, H, fn=torch.sigmoid), initial_state=_leaf(B, H, K, V),
    )  # fmt: skip


# (B, T, H, K, V, chunk, dtype)
GDN_CASES = [
    (1, 65, 2, 60, 32, 32, torch.float32),
    (1, 63, 2, 32, 16, 64, torch.bfloat16),
    (3, 1, 1, 16, 16, 64, torch.float32),
]


@pytest.mark.parametrize("case", GDN_CASES, ids=case_id)
def test_gated_deltanet_matches_reference(case):
    B, T, H, K, V, chunk, dtype = case
    _compare(
        _gdn_inputs(B, T, H, K, V), gated_deltanet_triton, gated_deltanet_reference, dtype, chunk_size=chunk
    )


def test_gated_deltanet_strong_decay_and_full_write():
    """alpha = e^-30 and beta = 1 (the transition I - k k^T is singular): finite, and still the reference."""
    x = _gdn_inputs(1, 40, 1, 16, 16)
    x["g"] = torch.full((1, 40, 1), -30.0, device=DEVICE).requires_grad_()
    x["beta"] = torch.ones(1, 40, 1, device=DEVICE).requires_grad_()
    o, state = gated_deltanet_triton(**x, output_final_state=True, chunk_size=16)
    o_ref, state_ref = gated_deltanet_reference(**x, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-4, atol=1e-5)
    (o.sum() + state.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in x.values())


def test_gated_deltanet_closed_gates_match_reference():
    """finfo(float32).min log decays, two in a row inside a chunk: the within-chunk cumulative sums would be
    -inf and their differences NaN; at the floor the kernels give the reference's output and gradients."""
    x = _gdn_inputs(1, 40, 1, 16, 16)
    g = x["g"].detach().clone()
    g[:, [3, 4, 20, 33]] = torch.finfo(torch.float32).min
    x["g"] = g.requires_grad_()
    _compare(x, gated_deltanet_triton, gated_deltanet_reference, torch.float32, chunk_size=16)


@pytest.mark.parametrize("name", ["gla", "lightning", "gated_deltanet"])
def test_empty_batch(name):
    """B = 0: an empty output of the right shape from the kernels' host code (reshapes that inferred -1
    from zero elements failed)."""
    q, k, v = (torch.randn(0, 5, 2, 16, device=DEVICE) for _ in range(3))
    gates = {
        "gla": (-torch.rand(0, 5, 2, 16, device=DEVICE),),
        "lightning": (-torch.rand(2, device=DEVICE),),
        "gated_deltanet": (-torch.rand(0, 5, 2, device=DEVICE), torch.rand(0, 5, 2, device=DEVICE)),
    }[name]
    o, state = getattr(ops, name)(q, k, v, *gates, output_final_state=True, backend="triton")
    assert o.shape == (0, 5, 2, 16) and state.shape == (0, 2, 16, 16)


def test_gated_deltanet_packed_sequences():
    """cu_seqlens == each sequence run on its own from its own initial state."""
    x = _gdn_inputs(1, 30, 1, 16, 16)
    x["initial_state"] = _leaf(2, 1, 16, 16)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=DEVICE)

    def separately(q, k, v, g, beta, initial_state, output_final_state):
        outs = [
            gated_deltanet_reference(
                q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                initial_state=initial_state[i : i + 1], output_final_state=True,
            )
            for i, (a, b) in enumerate([(0, 11), (11, 30)])
        ]  # fmt: skip
        return torch.cat([o for o, _ in outs], 1), torch.cat([s for _, s in outs], 0)

    _compare(
        x, lambda **a: gated_deltanet_triton(**a, cu_seqlens=cu, chunk_size=16), separately, torch.float32
    )


def test_gated_deltanet_dispatcher_selects_triton():
    x = _gdn_inputs(1, 9, 1, 16, 16)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    o, _ = ops.gated_deltanet(*args, backend="triton")
    torch.testing.assert_close(o, gated_deltanet_reference(*args)[0], rtol=1e-4, atol=1e-5)
