"""One driver over the whole registry: every mixer obeys the shared contract.

parallel == prefill + token-by-token decode; causal mixers do not look ahead; internals come out when
asked; bad input raises a clear error. A mechanism can pass small build options for these tests
through ``MechanismSpec.extra["test_options"]``. Vision (spatial) mixers declare
``extra={"spatial_dims": 1|2|3}``: they take (B, *spatial, C) maps, skip the sequence tests and are driven by
the spatial test instead (map size from ``extra["test_spatial_shape"]``, default 6 x 7 in 2D).
"""

import pytest
import torch

import gatelab
from gatelab.testing import assert_close

SPECS = gatelab.list_mechanisms()
ALL_MIXERS = [s for s in SPECS if s.family != "gate"]
MIXERS = [s for s in ALL_MIXERS if "spatial_dims" not in s.extra]  # sequence mixers, (B, T, C)
SPATIAL = [s for s in ALL_MIXERS if "spatial_dims" in s.extra]  # vision mixers, (B, *spatial, C)
CAUSAL = [s for s in MIXERS if s.causal]
BIDIRECTIONAL = [s for s in MIXERS if s.bidirectional]


def build(spec, **overrides):
    options = {"d_model": 64, "n_heads": 4, **spec.extra.get("test_options", {}), **overrides}
    torch.manual_seed(0)
    mixer = gatelab.make_mixer(spec.key, **options)
    return mixer.eval()


@pytest.mark.parametrize("spec", CAUSAL, ids=lambda s: s.key)
def test_decode_matches_parallel(spec):
    mixer = build(spec)
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        y_full, _ = mixer(x)
        y_prefix, state = mixer(x[:, :6])
        steps = [y_prefix]
        for t in range(6, 13):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y_t)
    assert_close(f"{spec.key} decode", torch.cat(steps, dim=1), y_full, torch.float32)


@pytest.mark.parametrize("spec", CAUSAL, ids=lambda s: s.key)
def test_causal_no_lookahead(spec):
    mixer = build(spec)
    x = torch.randn(2, 17, 64)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 8, 64)
    with torch.no_grad():
        y1, _ = mixer(x)
        y2, _ = mixer(x2)
    torch.testing.assert_close(y1[:, :9], y2[:, :9], rtol=1e-5, atol=1e-5)
    assert (y1[:, 9:] - y2[:, 9:]).abs().max() > 1e-4


@pytest.mark.parametrize("spec", BIDIRECTIONAL, ids=lambda s: s.key)
def test_bidirectional_sees_everything(spec):
    mixer = build(spec, causal=False)
    x = torch.randn(2, 12, 64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        y1, _ = mixer(x)
        y2, _ = mixer(x2)
    assert (y1[:, 0] - y2[:, 0]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="causal"):
        mixer(x[:, :1], state=object())


@pytest.mark.parametrize("spec", MIXERS, ids=lambda s: s.key)
def test_internals_and_gradients(spec):
    mixer = build(spec).train()
    x = torch.randn(2, 9, 64, requires_grad=True)
    y, _state, internals = mixer(x, return_internals=True)
    assert y.shape == x.shape and isinstance(internals, dict)
    if "attn" in internals:
        attn = internals["attn"]
        assert attn.shape[-2:] == (9, 9) and torch.isfinite(attn).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, f"{spec.key}: parameter {name} gets no gradient"


@pytest.mark.parametrize("spec", MIXERS, ids=lambda s: s.key)
def test_bad_input(spec):
    mixer = build(spec)
    with pytest.raises(ValueError, match="d_model"):
        mixer(torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match=r"\(B, T"):
        mixer(torch.randn(5, 64))
    with pytest.raises(TypeError):
        mixer(torch.ones(2, 5, 64, dtype=torch.long))


def test_unknown_key_and_option():
    with pytest.raises(ValueError, match="unknown mechanism 'nope'.*softmax"):
        gatelab.make_mixer("nope")
    with pytest.raises(TypeError, match="valid options"):
        gatelab.make_mixer("softmax", d_model=64, n_heads=4, not_an_option=1)
    with pytest.raises(ValueError, match="divisible"):
        gatelab.make_mixer("softmax", d_model=65, n_heads=4)


def _spatial_shape(spec):
    default = {1: (9,), 2: (6, 7), 3: (4, 5, 6)}[spec.extra["spatial_dims"]]
    return tuple(spec.extra.get("test_spatial_shape", default))


@pytest.mark.parametrize("spec", SPATIAL, ids=lambda s: s.key)
def test_spatial_mixer(spec):
    mixer = build(spec).train()
    spatial = _spatial_shape(spec)
    x = torch.randn(2, *spatial, 64, requires_grad=True)
    y, _state, internals = mixer(x, return_internals=True)
    assert y.shape == x.shape and isinstance(internals, dict)
    if "attn" in internals:
        attn = internals["attn"]
        N = x[0, ..., 0].numel()
        assert attn.shape[-2] == N and torch.isfinite(attn).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, f"{spec.key}: parameter {name} gets no gradient"
    # bad input: wrong channels, a sequence instead of a map, integer tensors
    with pytest.raises(ValueError, match="d_model"):
        mixer(torch.randn(2, *spatial, 63))
    with pytest.raises(ValueError):
        mixer(torch.randn(2, *spatial[:-1], 64) if len(spatial) > 1 else torch.randn(2, 64))
    with pytest.raises(TypeError):
        mixer(torch.ones(2, *spatial, 64, dtype=torch.long))
