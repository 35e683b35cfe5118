"""Memora's memory: rows on the simplex; the logit form is the paper's Softmax(alpha log W - eta grad) step;
chunk 1 is the recurrence with every gradient; chunked differs by design."""

import functools

import pytest
import torch
from miras_loop import (
    check_chunk_one_is_the_recurrence,
    check_chunk_start_definition,
    chunk_gap,
    memory_inputs,
)

from gatelab.ops.memora import memora, simplex_rows
from gatelab.testing import assert_close

inputs = functools.partial(memory_inputs, eta_scale=0.5)


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
    check_chunk_one_is_the_recurrence(memora, {n: t.requires_grad_() for n, t in inputs().items()})


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunk_form_is_the_chunk_start_gradient_definition(chunk_size):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    check_chunk_start_definition(memora, x, psi=lambda e: 2 * e, readout=simplex_rows, chunk_size=chunk_size)


def test_chunked_differs_from_the_recurrence_by_design():
    assert chunk_gap(memora, inputs(T=32)) > 1e-3
