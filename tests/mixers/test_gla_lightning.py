"""gla and lightning mixers: the paper's gate and decays, the T x T operator they report, decoding across
chunk boundaries, and config errors (the registry-wide contract is tested in tests/test_registry_mixers.py)."""

import pytest
import torch
import torch.nn.functional as F

import gatelab
from gatelab.mixers.lightning import lightning_log_decay
from gatelab.testing import assert_close


def test_gla_gate_is_the_papers():
    mixer = gatelab.make_mixer("gla", d_model=64, n_heads=4)
    x = torch.randn(2, 9, 64)
    _, state, internals = mixer(x, return_internals=True)
    alpha = internals["gate"]  # (B, T, H, K), K = d/2 / H
    assert alpha.shape == (2, 9, 4, 8)
    logits = mixer.gate_up(mixer.gate_down(x)).view(2, 9, 4, 8)
    assert_close("alpha^16", alpha.pow(16), torch.sigmoid(logits))
    assert state.state.shape == (2, 4, 8, 16) and state.length == 9  # d_k = d/2, d_v = d


def test_gla_attn_is_the_operator_before_norm():
    mixer = gatelab.make_mixer("gla", d_model=32, n_heads=2)
    x = torch.randn(1, 12, 32)
    seen = {}
    mixer.norm.register_forward_hook(lambda m, args, out: seen.update(o=args[0]))
    _, _, internals = mixer(x, return_internals=True)
    v = mixer.v_proj(x).view(1, 12, 2, -1)
    assert_close("attn v", torch.einsum("bhij,bjhv->bihv", internals["attn"], v), seen["o"])


def test_lightning_decays_and_operator():
    assert_close("decay", lightning_log_decay(4).exp(), torch.exp(-(2.0 ** -(8 * torch.arange(1, 5.0) / 4))))
    first, last = lightning_log_decay(8, 0, 4), lightning_log_decay(8, 3, 4)
    assert (first.exp() < last.exp()).all() and torch.allclose(last, -1e-5 * 2.0 ** -torch.arange(1, 9.0))
    mixer = gatelab.make_mixer("lightning", d_model=32, n_heads=4, output_gate="sigmoid")
    x = torch.randn(1, 10, 32)
    _, _, internals = mixer(x, return_internals=True)
    assert (internals["gate"] > 0).all() and (internals["gate"] < 1).all()
    q, k, v, _ = mixer.qkvu_proj(x).chunk(4, dim=-1)
    q, k, v = F.silu(q).view(1, 10, 4, 8), F.silu(k).view(1, 10, 4, 8), v.view(1, 10, 4, 8)
    o_ref = gatelab.ops.lightning(q, k, v, mixer.log_decay, scale=1.0, backend="reference")[0]
    assert_close("attn v", torch.einsum("bhij,bjhv->bihv", internals["attn"], v), o_ref)


@pytest.mark.parametrize("key", ["gla", "lightning"])
def test_decode_across_chunks(key):
    # prefill of 70 tokens (chunk 16: several chunks plus a partial one), then 5 single steps and a block of 7
    mixer = gatelab.make_mixer(key, d_model=32, n_heads=2, chunk_size=16).eval()
    x = torch.randn(2, 82, 32)
    with torch.no_grad():
        y_full, _ = mixer(x)
        y, state = mixer(x[:, :70])
        parts = [y]
        for t in range(70, 75):
            y, state = mixer(x[:, t : t + 1], state=state)
            parts.append(y)
        y, state = mixer(x[:, 75:], state=state)
        parts.append(y)
    assert state.length == 82
    assert_close(f"{key} decode", torch.cat(parts, dim=1), y_full)


def test_config_errors():
    with pytest.raises(ValueError, match="causal"):
        gatelab.make_mixer("gla", d_model=64, n_heads=4, causal=False)
    with pytest.raises(ValueError, match="expand_k"):
        gatelab.make_mixer("gla", d_model=64, n_heads=3)
    with pytest.raises(ValueError, match="backend"):
        gatelab.make_mixer("gla", d_model=64, n_heads=4, backend="flex")
    with pytest.raises(ValueError, match="layer_idx"):
        gatelab.make_mixer("lightning", d_model=64, n_heads=4, layer_idx=2, n_layers=2)
    with pytest.raises(ValueError, match="output_gate"):
        gatelab.make_mixer("lightning", d_model=64, n_heads=4, output_gate="tanh")
    with pytest.raises(TypeError, match="RecurrentState"):
        gatelab.make_mixer("lightning", d_model=64, n_heads=4)(torch.randn(1, 2, 64), state=torch.zeros(1))
