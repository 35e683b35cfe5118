"""Gated-SwinRMT: windows (SDPA) against the whole-map reference inside the mixer (output and every
gradient; odd, non-square maps, shifted windows, both modes, batch 3), gate = 1 is RMT in windows, windows
keep tokens apart, option checks."""

import pytest
import torch
from helpers import check_mixer_backends_agree

import gatelab


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("gated_swin_rmt", d_model=16, n_heads=2, window_size=4, **options)


@pytest.mark.parametrize("shape", [(9, 7), (4, 4), (3, 10)])
@pytest.mark.parametrize("mode", ["axial", "full"])
def test_windows_match_reference(shape, mode):
    # no biases: a key bias shifts every score of a query alike, so its true gradient is 0 and both
    # backends give only rounding noise, which no relative error can compare
    check_mixer_backends_agree(build(shift_size=2, mode=mode, bias=False), torch.randn(3, *shape, 16), "sdpa")


def test_gate_one_reduces_to_rmt():
    gated, plain = build(), build(gate=False)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate_proj")})
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.fill_(30.0)  # sigmoid(30) is 1 in fp32
        x = torch.randn(2, 6, 7, 16)
        assert torch.equal(torch.sigmoid(gated.gate_proj(x)), torch.ones(2, 6, 7, 16))
        torch.testing.assert_close(gated(x)[0], plain(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["axial", "full"])
def test_windows_keep_tokens_apart(mode):
    mixer = build(lce=False, mode=mode).eval()  # the LCE conv would reach over the window border
    x = torch.randn(1, 8, 8, 16)
    x2 = x.clone()
    x2[:, 6, 6] += 1.0  # in the bottom-right window
    with torch.no_grad():
        y, _ = mixer(x)
        y2, _ = mixer(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and torch.equal(y[:, :, :4], y2[:, :, :4])
    assert (y2[:, 4:, 4:] - y[:, 4:, 4:]).abs().max() > 1e-5
    shifted = build(lce=False, mode=mode, shift_size=2).eval()
    with torch.no_grad():
        y, _ = shifted(x)
        y2, _ = shifted(x2)
    assert (y2[:, 2:6, 2:6] - y[:, 2:6, 2:6]).abs().max() == 0  # rolled windows: {2..5} stays clear of 6
    assert (y2[:, 6:, 6:] - y[:, 6:, 6:]).abs().max() > 1e-5


def test_option_checks():
    with pytest.raises(ValueError, match="shift_size must be in"):
        build(shift_size=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        build(mode="diagonal")
    with pytest.raises(ValueError, match="lce_kernel must be odd"):
        build(lce_kernel=4)
    with pytest.raises(ValueError, match="decay_initial"):
        build(decay_initial=0.0)
