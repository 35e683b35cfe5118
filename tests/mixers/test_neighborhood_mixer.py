"""The neighborhood mixer on (B, H, W, C) maps and as a causal 1D sequence mixer with a KV cache."""

import pytest
import torch

import gatelab
from gatelab.testing import assert_close


def test_map_mixer_is_local_and_backends_agree():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer("neighborhood", d_model=32, n_heads=2, kernel_size=3).eval()
    x = torch.randn(2, 8, 9, 32)
    with torch.no_grad():
        y, state, internals = mixer(x, return_internals=True)
        x2 = x.clone()
        x2[:, 7, 8] += 1.0  # a far corner
        y2, _ = mixer(x2)
        mixer.config.backend = "flex"
        y_flex, _ = mixer(x)
        mixer.config.backend = "reference"
        y_ref, _ = mixer(x)
    assert state is None and y.shape == x.shape
    assert_close("flex", y_flex, y_ref, torch.float32)
    assert_close("auto", y, y_ref, torch.float32)
    assert torch.equal(y[:, :5], y2[:, :5])  # rows 0-4 never see row 7 with kernel 3
    assert (y2[:, 6:, 7:] - y[:, 6:, 7:]).abs().max() > 1e-4
    attn = internals["attn"]  # (B, H, N, N)
    assert attn.shape == (2, 2, 72, 72) and ((attn > 0).sum(-1) == 9).all()


def test_global_tokens_and_3d():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer(
        "neighborhood",
        d_model=32,
        n_heads=2,
        spatial_dims=3,
        kernel_size=(2, 3, 3),
        stride=(1, 3, 1),
        n_global=2,
    )
    x = torch.randn(1, 3, 6, 5, 32, requires_grad=True)
    y, _, internals = mixer(x, return_internals=True)
    assert y.shape == x.shape
    assert ((internals["attn"] > 0).sum(-1) == 2 * 3 * 3 + 2).all()
    y.sum().backward()
    assert mixer.global_tokens.grad is not None and mixer.global_tokens.grad.abs().sum() > 0


def test_causal_1d_decodes_like_parallel():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer(
        "neighborhood", d_model=32, n_heads=4, n_kv_heads=2, spatial_dims=1, causal=True,
        kernel_size=3, dilation=2, n_global=1, rope=True,
    ).eval()  # fmt: skip
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        y_full, _, internals = mixer(x, return_internals=True)
        y, state = mixer(x[:, :2])  # a prefix shorter than kernel * dilation
        steps = [y]
        for t in range(2, 15):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y_t)
        x2 = x.clone()
        x2[:, 10:] = torch.randn(2, 5, 32)
        y2, _ = mixer(x2)
    assert_close("decode", torch.cat(steps, 1), y_full, torch.float32)
    torch.testing.assert_close(y_full[:, :10], y2[:, :10])  # causal
    attn = internals["attn"][0, 0]  # (T, T + n_global)
    assert attn[10].nonzero().flatten().tolist() == [6, 8, 10, 15]  # group of 10 (even), last 3, global key


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(kernel_size=3, stride=4), "stride"),
        (dict(rope=True), "rope"),
        (dict(spatial_dims=1, causal=True, kernel_size=4, stride=2), "stride 1"),
        (dict(spatial_dims=1, causal=True, backend="flex"), "reference"),
    ],
)
def test_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        gatelab.make_mixer("neighborhood", d_model=32, n_heads=2, **options)


def test_map_errors():
    mixer = gatelab.make_mixer("neighborhood", d_model=32, n_heads=2, kernel_size=5)
    with pytest.raises(ValueError, match="kernel_size \\* dilation cannot exceed"):
        mixer(torch.randn(1, 4, 8, 32))
    with pytest.raises(ValueError, match="causal 1D"):
        mixer(torch.randn(1, 8, 8, 32), state=object())


def test_causal_1d_state_is_checked():
    options = dict(d_model=32, n_heads=4, spatial_dims=1, causal=True, kernel_size=3)
    mixer = gatelab.make_mixer("neighborhood", **options).eval()
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 5, 32))
        assert state.signature.mechanism == "neighborhood" and state.signature.heads == 4
        with pytest.raises(ValueError, match="batch 1.*got a state of .*batch 2"):
            mixer(torch.randn(1, 1, 32), state=state)
        _, softmax_state = gatelab.make_mixer("softmax", d_model=32, n_heads=4)(torch.randn(2, 5, 32))
        with pytest.raises(ValueError, match="got a state of softmax"):  # same shapes, another mechanism
            mixer(torch.randn(2, 1, 32), state=softmax_state)
