"""HER-Seg dual-gated linear attention: matmul against the dense reference inside the mixer (output and
every gradient; odd, non-square maps, batch 3), the mixer with RoPE, LePE and the output gate off against
plain linear attention written out, internals, option checks."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_mixer_backends_agree

import gatelab
from gatelab.ops.lina import lina_reference
from gatelab.testing import assert_close


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("dual_gated_linear", d_model=16, n_heads=2, **options)


@pytest.mark.parametrize("shape", [(5, 7), (4, 4), (1, 6), (7, 2)])
def test_matmul_matches_reference(shape):
    check_mixer_backends_agree(build(), torch.randn(3, *shape, 16), "matmul")


def test_without_rope_lepe_and_gate_it_is_linear_attention_with_a_value_gate():
    mixer = build(rope=False, lepe=False, gate=False).eval()
    x = torch.randn(2, 5, 6, 16)
    with torch.no_grad():
        y, _ = mixer(x)
        q, k = mixer.qk(x).reshape(2, 30, 2, 2, 8).unbind(2)  # (B, N, h, D)
        v = mixer.down_proj(F.silu(mixer.up_proj(x))).reshape(2, 30, 2, 8)
        ones = torch.ones(2, 30, 2)
        o, _ = lina_reference(q, k, v, ones, ones, causal=False, feature_map="elu", eps=1e-6 * 30)
        expected = mixer.out_proj(o.reshape(2, 5, 6, 16))
    assert_close("plain linear attention", y, expected, torch.float32)


def test_gates_and_internals():
    mixer = build().eval()
    x = torch.randn(2, 4, 5, 16)
    with torch.no_grad():
        y, state, internals = mixer(x, return_internals=True)
    assert state is None and internals["attn"].shape == (2, 2, 20, 20)
    torch.testing.assert_close(internals["gate"], F.silu(mixer.act_proj(x)))
    assert mixer.up_proj.out_features == 4  # the value gate's bottleneck: ratio 0.25
    no_gate = build(gate=False)
    assert not hasattr(no_gate, "act_proj")


def test_option_checks():
    with pytest.raises(ValueError, match="rope needs d_model divisible by 4"):
        gatelab.make_mixer("dual_gated_linear", d_model=18, n_heads=2)
    with pytest.raises(ValueError, match="value_ratio"):
        build(value_ratio=0.01)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        gatelab.make_mixer("dual_gated_linear", d_model=16, n_heads=3)
