"""The softmax-family mixers beyond the registry contract: every gate variant decodes like its parallel
pass, the fused q/gate layouts equal separate projections, gate limits, and paper inits."""

import math

import pytest
import torch

import gatelab
from gatelab.testing import assert_close

VARIANTS = [
    ("gated_softmax", {}),
    ("gated_softmax", {"gate": "headwise"}),
    ("gated_softmax", {"position": "value"}),
    ("gated_softmax", {"position": "value", "gate": "headwise", "n_kv_heads": 2}),
    ("gated_softmax", {"gate_fn": "silu", "combine": "add"}),
    ("gated_softmax", {"gate_fn": "ns_sigmoid", "sharing": "head_shared"}),
    ("gated_softmax", {"input_dependent": False}),
    ("gated_softmax", {"fused": "grouped", "n_kv_heads": 2}),
    ("gated_softmax", {"fused": "per_head", "gate": "headwise", "qk_norm": True}),
    ("clipped_softmax", {"alpha": 8.0, "max_seq_len": 32}),
    ("clipped_softmax", {"alpha": None, "gamma": -0.05, "zeta": 1.03, "n_kv_heads": 1}),
    ("gated_heads", {}),
    ("gated_heads", {"mlp_hidden": 4, "pi_init": 0.5}),
    ("softmax", {"n_kv_heads": 2, "qk_norm": True}),
    ("softmax", {"qkv_bias": True, "qk_norm": True, "qk_norm_eps": 1e-5, "rope_dims": 8}),
]


@pytest.mark.parametrize("key,options", VARIANTS, ids=lambda v: str(v))
def test_variant_decode_matches_parallel(key, options):
    mixer = gatelab.make_mixer(key, d_model=64, n_heads=4, **options).eval()
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        y, _ = mixer(x)
        y0, state = mixer(x[:, :4])
        parts = [y0]
        for t in range(4, 11):
            yt, state = mixer(x[:, t : t + 1], state=state)
            parts.append(yt)
    assert_close(f"{key} {options}", torch.cat(parts, 1), y, torch.float32)
    assert state.length == 11 and state.k.shape[1] == 11


def _copy_attention(dst, src):
    for name in ("k_proj", "v_proj", "o_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


@pytest.mark.parametrize("layout", ["grouped", "per_head"])
@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_fused_layouts_equal_separate_projections(layout, gate):
    H, Hkv, D, d = 4, 2, 16, 64
    fused = gatelab.make_mixer("gated_softmax", d_model=d, n_heads=H, n_kv_heads=Hkv, gate=gate, fused=layout)
    plain = gatelab.make_mixer("gated_softmax", d_model=d, n_heads=H, n_kv_heads=Hkv, gate=gate)
    _copy_attention(plain, fused)
    G = D if gate == "elementwise" else 1
    W = fused.q_proj.weight.detach()  # (H*D + H*G, d)
    if layout == "grouped":  # rows per KV group: [q of the group's heads | their gates]
        rows = W.view(Hkv, -1, d)
        q_rows = rows[:, : H // Hkv * D].reshape(H * D, d)
        g_rows = rows[:, H // Hkv * D :].reshape(H * G, d)
    else:  # rows per head: [q_h | g_h]
        rows = W.view(H, D + G, d)
        q_rows, g_rows = rows[:, :D].reshape(H * D, d), rows[:, D:].reshape(H * G, d)
    with torch.no_grad():
        plain.q_proj.weight.copy_(q_rows)
        plain.gate_proj.weight.copy_(g_rows)
    x = torch.randn(2, 9, d)
    torch.testing.assert_close(fused(x)[0], plain(x)[0])


def test_open_gate_is_softmax_and_internals():
    gated = gatelab.make_mixer("gated_softmax", d_model=64, n_heads=4)
    plain = gatelab.make_mixer("softmax", d_model=64, n_heads=4)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate_proj")})
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias = torch.nn.Parameter(torch.full((64,), 40.0))
    x = torch.randn(2, 7, 64)
    y, _, internals = gated(x, return_internals=True)
    torch.testing.assert_close(y, plain(x)[0])
    assert internals["gate"].shape == (2, 7, 4, 16) and torch.all(internals["gate"] == 1)
    assert torch.allclose(internals["attn"].sum(-1), torch.ones(2, 4, 7))


def test_gated_heads_init_and_slices():
    mixer = gatelab.make_mixer("gated_heads", d_model=64, n_heads=4, pi_init=0.25)
    torch.testing.assert_close(mixer.gate_b1, torch.full((4, 1), math.log(0.25 / 0.75)))
    x = torch.randn(2, 5, 64)
    g = mixer.gate_logits(x)  # head h reads only x[..., 16h : 16(h+1)]
    x2 = x.clone()
    x2[..., 16:32] += 1.0
    g2 = mixer.gate_logits(x2)
    changed = (g - g2).abs().amax(dim=(0, 1, 3))
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0 and changed[3] == 0


def test_clipped_gamma_from_alpha_and_errors():
    mixer = gatelab.make_mixer("clipped_softmax", d_model=64, n_heads=4, alpha=4.0, max_seq_len=128)
    assert mixer.config.clip_gamma == pytest.approx(-4.0 / 128)
    with pytest.raises(ValueError, match="exactly one of alpha or gamma"):
        gatelab.make_mixer("clipped_softmax", d_model=64, n_heads=4, gamma=-0.1)
    with pytest.raises(ValueError, match="fused"):
        gatelab.make_mixer("gated_softmax", d_model=64, n_heads=4, fused="grouped", position="value")
    with pytest.raises(ValueError, match="gate must be one of"):
        gatelab.make_mixer("gated_softmax", d_model=64, n_heads=4, gate="channel")
    with pytest.raises(ValueError, match="pi_init"):
        gatelab.make_mixer("gated_heads", d_model=64, n_heads=4, pi_init=1.0)


def test_bias_norm_eps_and_partial_rope_options():
    """qkv_bias biases q/k/v only (Qwen2), qk_norm_eps reaches the norms, rope_dims rotates the leading
    channels only (partial RoPE); the defaults keep every earlier layout."""
    plain = gatelab.make_mixer("softmax", d_model=64, n_heads=4)
    assert plain.q_proj.bias is None and plain.o_proj.bias is None and plain.inv_freq.shape == (8,)
    mixer = gatelab.make_mixer("softmax", d_model=64, n_heads=4, qkv_bias=True, qk_norm=True, qk_norm_eps=1e-5,
                               rope_dims=4)  # fmt: skip
    assert mixer.q_proj.bias is not None and mixer.v_proj.bias is not None and mixer.o_proj.bias is None
    assert mixer.q_norm.eps == 1e-5 and mixer.inv_freq.shape == (2,)
    both = gatelab.make_mixer("softmax", d_model=64, n_heads=4, bias=True, qkv_bias=False)
    assert both.q_proj.bias is None and both.o_proj.bias is not None
    from gatelab.ops.common.rope import apply_rope

    x = torch.randn(1, 5, 4, 16)
    rotated = apply_rope(x, torch.arange(5) + 3, mixer.inv_freq)
    assert torch.equal(rotated[..., 4:], x[..., 4:]) and not torch.allclose(rotated[..., :4], x[..., :4])
    for bad in (3, 0, 18):
        with pytest.raises(ValueError, match="rope_dims must be an even int"):
            gatelab.make_mixer("softmax", d_model=64, n_heads=4, rope_dims=bad)
    with pytest.raises(ValueError, match="qk_norm_eps must be > 0"):
        gatelab.make_mixer("softmax", d_model=64, n_heads=4, qk_norm_eps=0.0)


def test_cache_override_runs_one_block_under_a_manager():
    from gatelab.mixers._kv_cache import KVCacheManager

    class Counting(KVCacheManager):
        calls = 0

        def update(self, *args):
            Counting.calls += 1
            return super().update(*args)

    mixer = gatelab.make_mixer("softmax", d_model=64, n_heads=4)
    x = torch.randn(1, 3, 64)
    with mixer.cache_override(Counting()):
        mixer(x)
    mixer(x)
    assert Counting.calls == 1 and type(mixer.cache_manager()) is KVCacheManager
    with pytest.raises(TypeError, match="manager must be a KVCacheManager"):
        with mixer.cache_override("plain"):
            pass
