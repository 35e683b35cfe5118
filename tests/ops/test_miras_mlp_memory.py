"""The Miras MLP memory (ops/common/mlp_memory.py): the hand-written gradient against autograd, and each op's
chunk form (outputs, final memory, every gradient, the initial memory's included) against the chunk-start
definition written with autograd, at chunk 1 (the recurrence) and longer chunks."""

import functools

import pytest
import torch

from gatelab.ops.common.memory import lp_gradient, lq_normalize
from gatelab.ops.common.mlp_memory import mlp_gradient_terms, mlp_read
from gatelab.ops.gated_deltanet import l2_normalize
from gatelab.ops.memora import memora, simplex_rows
from gatelab.ops.moneta import moneta
from gatelab.ops.yaad import yaad
from gatelab.testing import assert_close


def inputs(B=2, T=11, H=2, K=6, E=12, seed=0, delta=False):
    gen = torch.Generator().manual_seed(seed)
    x = {
        "q": l2_normalize(torch.randn(B, T, H, K, generator=gen)),
        "k": l2_normalize(torch.randn(B, T, H, K, generator=gen)),
        "v": torch.randn(B, T, H, K, generator=gen),
        "g": -0.2 * torch.rand(B, T, H, generator=gen),
        "eta": 0.1 * torch.rand(B, T, H, generator=gen),
    }
    if delta:
        x["delta"] = 0.5 + torch.rand(B, T, H, generator=gen)
    x["W1"] = torch.randn(B, H, K, E, generator=gen) / E**0.5
    x["W2"] = torch.randn(B, H, E, K, generator=gen) / K**0.5
    return {n: t.requires_grad_() for n, t in x.items()}


def lp_loss(e, p=3.0):
    return e.abs().pow(p).sum()


def huber_loss(e, delta):
    norm = e.norm(dim=-1, keepdim=True)
    return torch.where(
        norm <= delta, 0.5 * e.square().sum(-1, keepdim=True), delta * e.abs().sum(-1, keepdim=True)
    ).sum()


def autograd_loop(x, *, loss, readout, chunk_size):
    """W <- alpha W - eta dl/dW at the chunk-start memory, the gradient by autograd (create_graph, so the
    outer gradients see it), o_t = M(q_t)."""
    A = (x["W1"], x["W2"])
    outputs = []
    for t in range(x["q"].shape[1]):
        if t % chunk_size == 0:
            W0 = tuple(readout(a) for a in A)
        k_t, v_t = x["k"][:, t, :, None], x["v"][:, t, :, None]  # (B, H, 1, K)
        extra = (x["delta"][:, t, :, None, None],) if "delta" in x else ()
        value = loss(mlp_read(*W0, k_t) - v_t, *extra)
        grads = torch.autograd.grad(value, W0, create_graph=True)
        alpha, eta = x["g"][:, t].exp()[..., None, None], x["eta"][:, t][..., None, None]
        A = tuple(alpha * a - eta * d for a, d in zip(A, grads))
        outputs.append(mlp_read(*(readout(a) for a in A), x["q"][:, t, :, None])[:, :, 0])
    return torch.stack(outputs, dim=1), *A


def test_hand_written_gradient_is_autograds():
    x = inputs()
    W1, W2 = x["W1"].detach().requires_grad_(), x["W2"].detach().requires_grad_()
    k, v = x["k"].detach().transpose(1, 2), x["v"].detach().transpose(1, 2)  # (B, H, T, K)
    dW1, dW2 = torch.autograd.grad(lp_loss(mlp_read(W1, W2, k) - v), (W1, W2))
    dz, a, dh = mlp_gradient_terms(W1.detach(), W2.detach(), k, v, functools.partial(lp_gradient, power=3.0))
    assert_close("dW1", torch.einsum("bhcv,bhce->bhve", dz, a), dW1, torch.float32)
    assert_close("dW2", torch.einsum("bhce,bhck->bhek", dh, k), dW2, torch.float32)


CASES = {
    "moneta": (functools.partial(moneta, bias_power=3.0, norm_power=4.0), lp_loss,
               functools.partial(lq_normalize, power=4.0, floor=1.0), False),
    "yaad": (yaad, huber_loss, lambda A: A, True),
    "memora": (memora, lambda e: e.square().sum(), simplex_rows, False),
}  # fmt: skip


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize(
    "backend, chunk_size", [("chunk", 1), ("chunk", 4), ("reference", 1)]
)  # reference: chunk 1
def test_mlp_memory_is_the_chunk_start_definition(key, chunk_size, backend):
    """In fp64: the l_q normalisation, LN and GELU of eleven steps amplify fp32 rounding (moneta's dk differs
    by 1.5e-3 relative in fp32, 6e-14 in fp64), so the two computations are compared where they are exact."""
    op, loss, readout, delta = CASES[key]
    x = {n: t.detach().double().requires_grad_() for n, t in inputs(delta=delta).items()}
    tensors = {n: v for n, v in x.items() if n not in ("W1", "W2")}
    o, (W1, W2) = op(**tensors, memory="mlp", initial_state=(x["W1"], x["W2"]), output_final_state=True,
                     backend=backend, chunk_size=chunk_size)  # fmt: skip
    o_ref, W1_ref, W2_ref = autograd_loop(x, loss=loss, readout=readout, chunk_size=chunk_size)
    cotangent = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((o * cotangent).sum() + W1.sum() + W2.sum(), list(x.values()))
    grads_ref = torch.autograd.grad((o_ref * cotangent).sum() + W1_ref.sum() + W2_ref.sum(), list(x.values()))
    for name, actual, expected in [("o", o, o_ref), ("W1", W1, W1_ref), ("W2", W2, W2_ref)]:
        assert_close(name, actual, expected, torch.float64)
    for name, actual, expected in zip(x, grads, grads_ref):
        assert_close(f"d{name}", actual, expected, torch.float64)


def test_mlp_memory_needs_its_state_and_square_heads():
    x = {n: t.detach() for n, t in inputs().items()}
    args = (x["q"], x["k"], x["v"], x["g"], x["eta"])
    with pytest.raises(TypeError, match="memory='mlp' needs initial_state"):
        moneta(*args, memory="mlp")
    with pytest.raises(ValueError, match="V = K"):
        moneta(*args[:2], torch.randn(2, 11, 2, 4), *args[3:], memory="mlp", initial_state=(x["W1"], x["W2"]))
    with pytest.raises(ValueError, match="memory must be one of"):
        moneta(*args, memory="tree")
