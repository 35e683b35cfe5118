"""The Miras mixers (moneta, yaad, memora): chunk 1 is the recurrence through the whole layer, the default
chunk differs from it by design (and by how much), decoding after a chunked prefill continues its state,
and the paper's gates come out as internals."""

import pytest
import torch

import gatelab
from gatelab.testing import assert_close, rel_rms

KEYS = ("moneta", "yaad", "memora")


def build(key, **options):
    torch.manual_seed(0)
    return gatelab.make_mixer(key, d_model=32, n_heads=2, **options).eval()


@pytest.mark.parametrize("key", KEYS)
def test_chunk_one_layer_is_the_recurrent_layer(key):
    mixer = build(key, chunk_size=1)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        y_chunk, state_chunk = mixer(x)
        mixer.config.backend = "reference"
        y_ref, state_ref = mixer(x)
    assert_close(f"{key} y", y_chunk, y_ref, torch.float32)
    assert_close(f"{key} state", state_chunk.state, state_ref.state, torch.float32)


@pytest.mark.parametrize("key", KEYS)
def test_default_chunk_differs_from_the_recurrence_by_design(key):
    mixer = build(key)
    assert mixer.config.chunk_size == 16
    x = torch.randn(2, 48, 32)
    with torch.no_grad():
        y_chunk, _ = mixer(x)
        mixer.config.backend = "reference"
        y_ref, _ = mixer(x)
    gap = rel_rms(y_chunk, y_ref)
    assert 0 < gap < 0.5, gap  # not the recurrence, but close to it at init


@pytest.mark.parametrize("key", KEYS)
def test_decoding_after_a_chunked_prefill_is_the_recurrence_from_its_state(key):
    mixer = build(key)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        _, state = mixer(x[:, :16])  # one chunk of 16
        steps = []
        for t in range(16, 24):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y_t)
        _, prefill_state = mixer(x[:, :16])
        mixer.config.backend = "reference"
        y_ref, _ = mixer(x[:, 16:], state=prefill_state)
    assert_close(f"{key} decode", torch.cat(steps, dim=1), y_ref, torch.float32)


@pytest.mark.parametrize("key", KEYS)
def test_gates_are_in_range(key):
    mixer = build(key)
    with torch.no_grad():
        _, _, internals = mixer(torch.randn(2, 9, 32), return_internals=True)
    assert ((internals["gate"] > 0) & (internals["gate"] <= 1)).all()
    assert ((internals["eta"] > 0) & (internals["eta"] < 1)).all()
    if key == "yaad":
        assert (internals["delta"] > 0).all()


def test_moneta_options_are_checked():
    with pytest.raises(ValueError, match="bias_power must be >= 2"):
        build("moneta", bias_power=1.5)
    with pytest.raises(ValueError, match="norm_floor must be > 0"):
        build("moneta", norm_floor=0.0)


@pytest.mark.parametrize("key", KEYS)
def test_bidirectional_is_refused_under_its_own_name(key):
    with pytest.raises(ValueError, match=rf"{key} is a causal recurrence"):
        build(key, causal=False)


@pytest.mark.parametrize("key", KEYS)
def test_mlp_memory_decodes_as_it_runs_in_parallel_and_trains(key):
    mixer = build(key, memory="mlp", expand_v=1.0, chunk_size=1)
    assert mixer.config.learning_rate_max == 0.1
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        y_full, _ = mixer(x)
        y, state = mixer(x[:, :6])
        steps = [y]
        for t in range(6, 13):
            y, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y)
    assert isinstance(state.state, tuple) and state.state[0].shape == (2, 2, 16, 64)
    assert_close(f"{key} mlp decode", torch.cat(steps, dim=1), y_full, torch.float32)
    mixer.train()
    y, _ = mixer(x.requires_grad_())
    y.square().mean().backward()
    assert all(p.grad is not None for p in mixer.parameters())
    assert mixer.memory_w1.grad.abs().sum() > 0


def test_mlp_memory_needs_values_as_wide_as_keys():
    with pytest.raises(ValueError, match="memory='mlp' needs value_dim = key_dim"):
        build("moneta", memory="mlp")
    with pytest.raises(ValueError, match="memory must be one of"):
        build("yaad", memory="tree")
