"""ContMix: the gather aggregation against the dense reference inside the mixer (output and every gradient;
odd, non-square and small maps, batch 3), taps on the simplex, uniform taps from a zero weight projection,
option checks."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_mixer_backends_agree

import gatelab
from gatelab.mixers.contmix import relative_bias


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("contmix", d_model=16, n_heads=2, kernel_size=5, small_kernel=3, **options)


@pytest.mark.parametrize("shape", [(7, 9), (5, 5), (3, 8)])  # 3 x 8: upsampled to the kernel and pooled back
def test_gather_matches_reference(shape):
    check_mixer_backends_agree(build(), torch.randn(3, *shape, 16), "gather")


def test_taps_are_on_the_simplex_and_uniform_without_weights():
    mixer = build().eval()
    x = torch.randn(2, 6, 7, 16)
    with torch.no_grad():
        _, _, internals = mixer(x, return_internals=True)
        assert internals["taps_small"].shape == (2, 6, 7, 2, 9) and internals["taps_large"].shape[-1] == 25
        for taps in (internals["taps_small"], internals["taps_large"]):
            torch.testing.assert_close(taps.sum(-1), torch.ones(taps.shape[:-1]))
        mixer.weight_proj.weight.zero_()
        mixer.weight_proj.bias.zero_()
        small, large = mixer.taps(x)  # zero weights and zero (initial) relative bias: a box filter
    torch.testing.assert_close(small, torch.full_like(small, 1 / 9))
    torch.testing.assert_close(large, torch.full_like(large, 1 / 25))


def test_relative_bias_reads_the_key_minus_query_offset():
    rpb = torch.randn(1, 5, 5)
    bias = relative_bias(rpb, 4, 6, 3)  # (H, W, G, 9)
    # query (0, 0): its window starts at (0, 0), tap (a, b) sits at offset (a, b)
    assert bias[0, 0, 0, 1 * 3 + 2] == rpb[0, 2 + 1, 2 + 2]
    # query (2, 3): window starts at (1, 2), tap (0, 0) sits at offset (-1, -1)
    assert bias[2, 3, 0, 0] == rpb[0, 1, 1]


def test_small_maps_are_upsampled_as_the_code():
    mixer = build()
    y, _ = mixer(torch.randn(2, 2, 3, 16))  # smaller than the 5 x 5 kernel on both sides
    assert y.shape == (2, 2, 3, 16)


def test_gate_and_options():
    mixer = build().eval()
    x = torch.randn(1, 5, 6, 16)
    with torch.no_grad():
        _, _, internals = mixer(x, return_internals=True)
    torch.testing.assert_close(internals["gate"], F.silu(mixer.gate(x)))
    with pytest.raises(ValueError, match=r"divisible by 2 \* n_heads"):
        gatelab.make_mixer("contmix", d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="small_kernel .* must be <= kernel_size"):
        gatelab.make_mixer("contmix", d_model=16, n_heads=2, kernel_size=5, small_kernel=7)
