"""One driver over the whole registry: every mixer obeys the shared contract.

parallel == prefill + token-by-token decode; causal mixers do not look ahead; internals come out when
asked; bad input raises a clear error. A mechanism can pass small build options for these tests
through ``MechanismSpec.extra["test_options"]``. Vision (spatial) mixers declare
``extra={"spatial_dims": 1|2|3}``: they take (B, *spatial, C) maps, skip the sequence tests and are driven by
the spatial test instead (map size from ``extra["test_spatial_shape"]``, default 6 x 7 in 2D).
"""

import dataclasses
import math
import re
import types
import typing

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
LINEAR = [s for s in CAUSAL if s.family == "linear"]


def build(spec, **overrides):
    options = {"d_model": 64, "n_heads": 4, **spec.extra.get("test_options", {}), **overrides}
    torch.manual_seed(0)
    mixer = gatelab.make_mixer(spec.key, **options)
    return mixer.eval()


def spy_backends(mixer, monkeypatch) -> list:
    """Record (tokens, backend) of every call of a linear mixer's op."""
    op, calls = type(mixer).op, []

    def spy(*args, backend, **options):
        calls.append((args[0].shape[1], backend))
        return op(*args, backend=backend, **options)

    monkeypatch.setattr(type(mixer), "op", staticmethod(spy))
    return calls


@pytest.mark.parametrize("spec", CAUSAL, ids=lambda s: s.key)
def test_decode_matches_parallel(spec, monkeypatch):
    mixer = build(spec)
    calls = spy_backends(mixer, monkeypatch) if spec in LINEAR else None
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        y_full, _ = mixer(x)
        y_prefix, state = mixer(x[:, :6])
        steps = [y_prefix]
        for t in range(6, 13):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y_t)
    assert_close(f"{spec.key} decode", torch.cat(steps, dim=1), y_full, torch.float32)
    if calls is not None:  # one forward template: a prefill runs the configured backend, a step the step form
        assert calls == [(13, "auto"), (6, "auto")] + [(1, "recurrent")] * 7


@pytest.mark.parametrize("spec", CAUSAL, ids=lambda s: s.key)
def test_state_carries_its_mechanism_batch_and_heads(spec):
    mixer = build(spec)
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 5, 64))
        assert state.signature == mixer.state_signature(2) and state.signature.mechanism == spec.key
        with pytest.raises(ValueError, match=r"batch 3.*got a state of .*batch 2"):
            mixer(torch.randn(3, 1, 64), state=state)
        fewer_heads = build(spec, n_heads=2)
        with pytest.raises(ValueError, match=r"2 heads.*got a state of .*4 heads"):
            fewer_heads(torch.randn(2, 1, 64), state=state)
        # the same shapes from another mechanism
        forged = dataclasses.replace(state, signature=dataclasses.replace(state.signature, mechanism="other"))
        with pytest.raises(ValueError, match=rf"continues a state of {spec.key} .*got a state of other"):
            mixer(torch.randn(2, 1, 64), state=forged)


def test_a_same_shaped_state_of_another_mechanism_is_refused():
    softmax, gated = build(gatelab.get("softmax")), build(gatelab.get("gated_softmax"))
    with torch.no_grad():
        _, state = softmax(torch.randn(2, 5, 64))
        with pytest.raises(ValueError, match="gated_softmax .*got a state of softmax"):
            gated(torch.randn(2, 1, 64), state=state)


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


@pytest.mark.parametrize("spec", ALL_MIXERS, ids=lambda s: s.key)
def test_an_empty_batch_is_refused(spec):
    mixer = build(spec)
    shape = _spatial_shape(spec) if spec in SPATIAL else (5,)
    with pytest.raises(ValueError, match=r"at least one sequence \(B >= 1\)"):
        mixer(torch.randn(0, *shape, 64))


# wrong values per annotation; a union only takes a value that none of its arms accepts
WRONG = {bool: ["no", 1, None], int: [True, 2.0, "3"], float: ["1.0", True, None], str: [1, None]}


def _arms(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _wrong_values(hint):
    arms = _arms(hint)
    for arm in arms:
        for value in WRONG.get(arm, []):
            if not any(a is type(value) or (a is float and type(value) is int) for a in arms):
                yield value


def _base_options(spec):
    return {"d_model": 64, "n_heads": 4, **spec.extra.get("test_options", {})}


@pytest.mark.parametrize("spec", ALL_MIXERS, ids=lambda s: s.key)
def test_every_option_is_checked_against_its_annotation(spec):
    hints = typing.get_type_hints(spec.config_cls)
    checked = 0
    for f in dataclasses.fields(spec.config_cls):
        for value in _wrong_values(hints[f.name]):
            message = rf"{spec.key}: option '{f.name}' must be .*, got {re.escape(repr(value))}"
            with pytest.raises(TypeError, match=message):
                spec.config_cls(**{**_base_options(spec), f.name: value})
            checked += 1
        if float in _arms(hints[f.name]):
            for value in (math.nan, math.inf):
                with pytest.raises(ValueError, match=rf"{spec.key}: option '{f.name}' must be finite"):
                    spec.config_cls(**{**_base_options(spec), f.name: value})
    assert checked >= 8  # d_model, n_heads, causal and backend at least


SIZES = [
    (spec, name)
    for spec in ALL_MIXERS
    for name in ("d_model", "n_heads", "n_kv_heads", "head_dim")
    if name in {f.name for f in dataclasses.fields(spec.config_cls)}
]


@pytest.mark.parametrize("spec, option", SIZES, ids=lambda v: getattr(v, "key", v))
def test_zero_sizes_are_refused(spec, option):
    with pytest.raises(ValueError, match=option):
        spec.config_cls(**{**_base_options(spec), option: 0})
    with pytest.raises(ValueError, match=rf"^{spec.key}: .*{option}"):  # make_mixer says whose option
        gatelab.make_mixer(spec.key, **{**_base_options(spec), option: 0})


def test_a_new_config_gets_the_checks_and_may_allow_non_finite_floats():
    from gatelab.mixers._base import FINITE, MixerConfig

    @dataclasses.dataclass
    class NewConfig(MixerConfig):
        flag: bool = False
        limit: float = dataclasses.field(default=math.inf, metadata=FINITE)
        scale: float = 1.0

    assert NewConfig(limit=math.nan).limit != NewConfig().limit  # nan and inf allowed where the field says so
    with pytest.raises(
        TypeError, match=r"NewConfig: option 'flag' must be a bool \(True or False\), got 'no'"
    ):
        NewConfig(flag="no")
    with pytest.raises(ValueError, match="NewConfig: option 'scale' must be finite, got inf"):
        NewConfig(scale=math.inf)


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
