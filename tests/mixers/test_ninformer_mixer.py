"""NiNformer: the module against its fp32 definition (output and every gradient, odd and non-square maps,
batch 3), a map of another size refused, every token feeding every output."""

import pytest
import torch
from helpers import check_mixer_backends_agree

import gatelab


def build(map_size=(5, 7), **options):
    torch.manual_seed(0)
    return gatelab.make_mixer("ninformer", d_model=16, n_heads=2, map_size=map_size, hidden_dim=20, **options)


@pytest.mark.parametrize("shape", [(5, 7), (3, 3), (1, 4)])
def test_module_matches_reference(shape):
    check_mixer_backends_agree(build(map_size=shape, token_dim=6), torch.randn(3, *shape, 16), "torch")


def test_a_map_of_another_size_is_refused():
    mixer = build()
    with pytest.raises(
        ValueError, match=r"built for 5 x 7 maps .* 35 inputs\), got a 7 x 5 map; .*map_size=\(7, 5\)"
    ):
        mixer(torch.randn(2, 7, 5, 16))
    with pytest.raises(ValueError, match="map_size .* is required"):
        gatelab.make_mixer("ninformer", d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="map_size must be two positive ints"):
        build(map_size=(5, 0))


def test_every_token_feeds_every_output():
    mixer = build().eval()
    x = torch.randn(2, 5, 7, 16)
    x2 = x.clone()
    x2[:, 4, 6] = torch.randn(2, 16)  # the far corner (a shift by a constant would vanish in LayerNorm)
    with torch.no_grad():
        y, _ = mixer(x)
        y2, _ = mixer(x2)
    assert ((y2 - y).abs().amax(-1) > 1e-6).all()  # the token MLP spreads one token over the map


def test_token_dim_defaults_to_the_channel_width():
    mixer = build()
    assert mixer.token_mlp[0].out_features == 20 and mixer.token_mlp[0].in_features == 35
