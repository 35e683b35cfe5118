"""Memora's memory: rows on the simplex; the logit form is the paper's Softmax(alpha log W - eta grad) step;
chunk 1 is the recurrence with every gradient; chunked differs by design."""

import pytest
import torch
from miras_loop import chunk_start_loop

from gatelab.ops.gated_deltanet import l2_normalize
from gatelab.ops.memora import memora, simplex_rows
from gatelab.testing import assert_close, compare_grads, rel_rms


def inputs(B=2, T=13, H=3, K=8, V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": l2_normalize(torch.randn(B, T, H, K, generator=gen)),
        "k": l2_normalize(torch.randn(B, T, H, K, generator=gen)),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": -0.2 * torch.rand(B, T, H, generator=gen),
        "eta": 0.5 * torch.rand(B, T, H, generator=gen),
    }


def paper_step_loop(q, k, v, g, eta):
    """W_t = Softmax(alpha_t log W_{t-1} - eta_t 2 k_t^T (k_t W_{t-1} - v_t)), rows over V, W_0 = 1/V."""
    B, T, H, K = q.shape
    W = torch.full((B, H, K, v.shape[-1]), 1.0 / v.shape[-1])
    outputs = []
    for t in range(T):
        error = torch.einsum("bhk,bhkv->bhv", k[:, t], W) - v[:, t]
        gradient = 2 * k[:, t, :, :, None] * error[..., None, :]
        W = torch.softmax(g[:, t].exp()[..., None, None] * W.log() - eta[:, t, :, None, None] * gradient, -1)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K**-0.5, W))
    return torch.stack(outputs, dim=1), W


def test_logit_form_is_the_papers_softmax_step():
    x = inputs()
    o, A = memora(**x, backend="reference", output_final_state=True)
    o_paper, W_paper = paper_step_loop(**x)
    assert_close("o", o, o_paper, torch.float32)
    W = simplex_rows(A)
    assert_close("memory", W, W_paper, torch.float32)
    assert (W >= 0).all() and torch.allclose(W.sum(-1), torch.ones(W.shape[:-1]))


def test_chunk_one_is_the_recurrence_with_gradients():
    x = {n: t.requires_grad_() for n, t in inputs().items()}

    def run(backend, chunk_size=1):
        return lambda t: memora(**t, backend=backend, chunk_size=chunk_size, output_final_state=True)

    compare_grads(x, run("chunk"), run("reference"), torch.float32)
    compare_grads(x, run("recurrent"), run("reference"), torch.float32)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunk_form_is_the_chunk_start_gradient_definition(chunk_size):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    compare_grads(
        x,
        lambda t: memora(**t, backend="chunk", chunk_size=chunk_size, output_final_state=True),
        lambda t: chunk_start_loop(
            *t.values(), psi=lambda e: 2 * e, readout=simplex_rows, chunk_size=chunk_size
        ),
        torch.float32,
    )


def test_chunked_differs_from_the_recurrence_by_design():
    x = inputs(T=32)
    assert rel_rms(memora(**x, backend="chunk", chunk_size=16)[0], memora(**x, backend="reference")[0]) > 1e-3
