"""Moneta's memory: chunk 1 is the recurrence (outputs, final state, every gradient); the chunk form is the
chunk-start-gradient definition written token by token; p = q = 2 is the delta rule; state carrying."""

import functools

import pytest
import torch
from miras_loop import (
    check_chunk_one_is_the_recurrence,
    check_chunk_start_definition,
    chunk_gap,
    memory_inputs,
)

from gatelab.ops.common.memory import lq_normalize
from gatelab.ops.gated_deltanet import gated_deltanet_reference
from gatelab.ops.moneta import lp_gradient, moneta
from gatelab.testing import assert_close

inputs = memory_inputs


POWERS = [(2.0, 2.0), (3.0, 4.0), (3.0, 2.0), (2.0, 3.0)]


@pytest.mark.parametrize("p, q_norm", POWERS)
def test_chunk_one_is_the_recurrence_with_gradients(p, q_norm):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    check_chunk_one_is_the_recurrence(moneta, x, bias_power=p, norm_power=q_norm)


@pytest.mark.parametrize("p, q_norm", POWERS)
@pytest.mark.parametrize("chunk_size", [4, 5, 16])
def test_chunk_form_is_the_chunk_start_gradient_definition(p, q_norm, chunk_size):
    x = {n: t.requires_grad_() for n, t in inputs().items()}
    psi = functools.partial(lp_gradient, power=p)
    readout = functools.partial(lq_normalize, power=q_norm, floor=1.0)
    check_chunk_start_definition(moneta, x, psi=psi, readout=readout, chunk_size=chunk_size, bias_power=p,
                                 norm_power=q_norm)  # fmt: skip


def test_chunked_differs_from_the_recurrence_by_design():
    assert chunk_gap(moneta, inputs(T=32)) > 1e-3  # gradients at the chunk start: not the recurrence


@pytest.mark.parametrize("decay", [False, True])
def test_p_q_two_is_the_delta_rule(decay):
    """A = alpha A - 2 eta k (k A - v)^T is Gated DeltaNet with beta = 2 eta / alpha and values alpha v."""
    x = inputs()
    if not decay:
        x["g"] = torch.zeros_like(x["g"])
    o, S = moneta(**x, bias_power=2, norm_power=2, backend="reference", output_final_state=True)
    alpha = x["g"].exp()
    o_gdn, S_gdn = gated_deltanet_reference(x["q"], x["k"], x["v"] * alpha[..., None], x["g"],
                                            2 * x["eta"] / alpha, output_final_state=True)  # fmt: skip
    assert_close("o", o, o_gdn, torch.float32)
    assert_close("state", S, S_gdn, torch.float32)


@pytest.mark.parametrize("backend", ["chunk", "reference"])
def test_prefill_then_steps_carries_the_state(backend):
    x = inputs(T=12)
    full, final = moneta(**x, backend=backend, chunk_size=3, output_final_state=True)
    first = {n: t[:, :6] for n, t in x.items()}
    o1, state = moneta(**first, backend=backend, chunk_size=3, output_final_state=True)
    second = {n: t[:, 6:] for n, t in x.items()}
    o2, state = moneta(**second, backend=backend, chunk_size=3, initial_state=state, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), full, torch.float32)
    assert_close("state", state, final, torch.float32)


def test_packed_sequences_start_from_their_own_memory():
    x = inputs(B=1, T=11)
    cu = torch.tensor([0, 4, 11])
    packed, _ = moneta(**x, cu_seqlens=cu, chunk_size=4)
    parts = [moneta(**{n: t[:, a:b] for n, t in x.items()}, chunk_size=4)[0] for a, b in ((0, 4), (4, 11))]
    assert_close("packed", packed, torch.cat(parts, dim=1), torch.float32)


def test_bad_input_is_refused():
    x = inputs()
    with pytest.raises(ValueError, match="eta .* must be >= 0"):
        moneta(**{**x, "eta": -x["eta"] - 0.1})
    with pytest.raises(ValueError, match="g"):
        moneta(**{**x, "g": -x["g"] + 0.1})
    with pytest.raises(ValueError, match="bias_power must be a number >= 2"):
        moneta(**x, bias_power=1.5)
    with pytest.raises(ValueError, match=r"eta must have shape \(B, T, H\)"):
        moneta(**{**x, "eta": x["eta"][:, :3]})
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        moneta(**x, chunk_size=0)
