"""Affine-scaled attention: alpha = 1, beta = 0 is softmax attention; the SDPA path against the dense
reference (outputs and every gradient); beta reaches visible keys only."""

import pytest
import torch

from gatelab.ops.affine_scaled import affine_scaled, affine_scaled_weights
from gatelab.ops.softmax import softmax
from gatelab.testing import assert_close, compare_grads


def inputs(B=2, T=9, S=9, H=4, Hkv=2, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(B, T, H, D, generator=gen),
        "k": torch.randn(B, S, Hkv, D, generator=gen),
        "v": torch.randn(B, S, Hkv, D, generator=gen),
        "alpha": torch.rand(B, T, H, generator=gen),
        "beta": 0.1 * torch.randn(B, T, H, generator=gen),
    }


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_alpha_one_beta_zero_is_softmax(causal, backend):
    x = inputs()
    ones, zeros = torch.ones_like(x["alpha"]), torch.zeros_like(x["beta"])
    o = affine_scaled(x["q"], x["k"], x["v"], ones, zeros, causal=causal, backend=backend)
    assert_close("affine(1, 0)", o, softmax(x["q"], x["k"], x["v"], causal=causal, backend="reference"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S", [9, 14])  # S > T: queries bottom-right aligned, as with a KV cache
def test_sdpa_matches_reference_with_gradients(causal, S):
    x = {name: t.requires_grad_() for name, t in inputs(S=S).items()}

    def run(backend):
        return lambda t: affine_scaled(t["q"], t["k"], t["v"], t["alpha"], t["beta"], causal=causal,
                                       backend=backend)  # fmt: skip

    compare_grads(x, run("sdpa"), run("reference"), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_beta_respects_the_causal_mask(backend):
    x = inputs(T=10, S=10)
    changed = {**x, "k": x["k"].clone(), "v": x["v"].clone()}
    changed["k"][:, 6:] += 3.0
    changed["v"][:, 6:] += 5.0  # beta != 0: a leak of beta onto future keys would move earlier outputs
    o1 = affine_scaled(**x, causal=True, backend=backend)
    o2 = affine_scaled(**changed, causal=True, backend=backend)
    torch.testing.assert_close(o1[:, :6], o2[:, :6], rtol=1e-6, atol=1e-6)
    assert (o1[:, 6:] - o2[:, 6:]).abs().max() > 1e-2
    w = affine_scaled_weights(x["q"], x["k"], x["alpha"], x["beta"], causal=True)
    assert (w.triu(1) == 0).all()


def test_weights_sum_to_alpha_plus_n_beta():
    x = inputs(T=7, S=7)
    w = affine_scaled_weights(x["q"], x["k"], x["alpha"], x["beta"], causal=True)  # (B, H, T, S)
    visible = torch.arange(1, 8, dtype=torch.float32)[:, None]  # (T, 1)
    expected = (x["alpha"] + visible * x["beta"]).transpose(1, 2)  # (B, H, T)
    torch.testing.assert_close(w.sum(-1), expected, rtol=1e-5, atol=1e-6)


def test_bad_alpha_shape_is_refused():
    x = inputs()
    with pytest.raises(ValueError, match=r"alpha must have shape \(B, Tq, H\)"):
        affine_scaled(x["q"], x["k"], x["v"], x["alpha"][:, :3], x["beta"])
    with pytest.raises(TypeError, match="beta must be a torch.Tensor"):
        affine_scaled(x["q"], x["k"], x["v"], x["alpha"], 0.0)
