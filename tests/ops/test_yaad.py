"""Yaad's memory: an infinite Huber threshold is the delta rule; chunk 1 is the recurrence with every
gradient; the Huber gradient switches on the error's norm."""

import functools

import pytest
import torch
from miras_loop import (
    check_chunk_one_is_the_recurrence,
    check_chunk_start_definition,
    chunk_gap,
    memory_inputs,
)

from gatelab.ops.gated_deltanet import gated_deltanet_reference
from gatelab.ops.yaad import huber_gradient, yaad
from gatelab.testing import assert_close

inputs = functools.partial(memory_inputs, delta=True)


def test_infinite_threshold_is_the_delta_rule():
    """A = alpha A - eta k (k A - v)^T is Gated DeltaNet with beta = eta / alpha and values alpha v."""
    x = {**inputs(), "delta": torch.full((2, 13, 3), float("inf"))}
    alpha = x["g"].exp()
    for backend in ("reference", "chunk"):
        o, S = yaad(**x, backend=backend, chunk_size=1, output_final_state=True)
        o_gdn, S_gdn = gated_deltanet_reference(x["q"], x["k"], x["v"] * alpha[..., None], x["g"],
                                                x["eta"] / alpha, output_final_state=True)  # fmt: skip
        assert_close(f"{backend} o", o, o_gdn, torch.float32)
        assert_close(f"{backend} state", S, S_gdn, torch.float32)


def test_chunk_one_is_the_recurrence_with_gradients():
    check_chunk_one_is_the_recurrence(yaad, {n: t.requires_grad_() for n, t in inputs().items()})


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunk_form_is_the_chunk_start_gradient_definition(chunk_size):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    check_chunk_start_definition(yaad, x, psi=huber_gradient, readout=lambda A: A, chunk_size=chunk_size)


def test_chunked_differs_from_the_recurrence_by_design():
    assert chunk_gap(yaad, inputs(T=32)) > 1e-3


def test_huber_gradient_switches_on_the_error_norm():
    error = torch.tensor([[0.3, -0.4], [3.0, -4.0]])  # norms 0.5 and 5
    delta = torch.tensor([[1.0], [1.0]])
    torch.testing.assert_close(huber_gradient(error, delta), torch.tensor([[0.3, -0.4], [1.0, -1.0]]))


def test_bad_threshold_is_refused():
    x = inputs()
    with pytest.raises(ValueError, match="delta .* must be > 0"):
        yaad(**{**x, "delta": torch.zeros_like(x["delta"])})
    with pytest.raises(ValueError, match=r"delta must have shape \(B, T, H\)"):
        yaad(**{**x, "delta": x["delta"][:, :2]})
