"""Activator: the module against its fp32 definition (output and every gradient), channel mixing only
(permuting the tokens permutes the outputs), the vision-mixer contract."""

import pytest
import torch
from helpers import check_mixer_backends_agree

import gatelab


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("activator", d_model=16, n_heads=2, hidden_dim=24, **options)


@pytest.mark.parametrize("shape", [(5, 7), (1, 1), (4, 4)])
def test_module_matches_reference(shape):
    check_mixer_backends_agree(build(), torch.randn(3, *shape, 16), "torch")


def test_one_layer_norm_is_shared_by_both_branches():
    mixer = build()
    assert [n for n, _ in mixer.named_modules() if "norm" in n] == ["norm"]


def test_permuting_tokens_permutes_outputs():
    mixer = build().eval()
    x = torch.randn(2, 5, 6, 16)
    perm = torch.randperm(30)
    with torch.no_grad():
        y, state = mixer(x)
        y_perm, _ = mixer(x.reshape(2, 30, 16)[:, perm].reshape(2, 5, 6, 16))
    assert state is None
    torch.testing.assert_close(y_perm.reshape(2, 30, 16), y.reshape(2, 30, 16)[:, perm])


def test_vision_contract():
    with pytest.raises(ValueError, match="activator: a vision mixer .* has no causal form"):
        build(causal=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        build(backend="sdpa")
    mixer = build()
    with pytest.raises(ValueError, match="no decoding state"):
        mixer(torch.randn(1, 2, 2, 16), state=object())
    with pytest.raises(ValueError, match=r"\(B, H, W, d_model\)"):
        mixer(torch.randn(2, 5, 16))
