"""Feature-map gates and gated pooling (gatelab.gates.vision): shapes, ranges, the limits that reduce
each to its baseline, MHIM's masking, registration and clear errors for bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import gatelab
from gatelab.gates.vision import (
    ClassProbGate,
    ClassProbGateConfig,
    FeatureSelectionGate,
    FeatureSelectionGateConfig,
    GatedAttentionPooling,
    GatedAttentionPoolingConfig,
    GridAttentionGate,
    GridAttentionGateConfig,
    consistency_loss,
    ema_update,
    hard_instance_mask,
)
from gatelab.testing import assert_close

KEYS = ("class_prob_gate", "feature_selection_gate", "gated_abmil", "grid_attention_gate")


def test_gates_are_registered_in_the_gate_family():
    gates = {s.key: s for s in gatelab.list_mechanisms(family="gate")}
    for key in KEYS:
        assert key in gates and not gates[key].causal and not gates[key].bidirectional
    gate = gatelab.make_mixer("grid_attention_gate", x_channels=4, g_channels=8)
    assert isinstance(gate, GridAttentionGate) and gate.config.inter_channels == 2


# additive attention gate -------------------------------------------------------------------------------
@pytest.mark.parametrize("sub_sample", [1, 2])
def test_grid_attention_gate_shapes_range_and_equation(sub_sample):
    torch.manual_seed(0)
    gate = GridAttentionGate(GridAttentionGateConfig(6, 10, inter_channels=5, sub_sample=sub_sample))
    x, g = torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)  # g from the coarser scale
    y, alpha = gate(x, g)
    assert y.shape == x.shape and alpha.shape == (2, 1, 8, 8)
    assert alpha.min() >= 0 and alpha.max() <= 1
    assert_close("out = alpha * x", y, alpha * x, torch.float32)
    # the equation, written out: q = psi^T ReLU(W_x x + W_g g + b) + b_psi on W_x's grid, resampled
    theta = F.conv2d(x, gate.theta.weight, stride=sub_sample)
    phi = F.interpolate(F.conv2d(g, gate.phi.weight, gate.phi.bias), size=theta.shape[2:], mode="bilinear")
    q = F.conv2d(F.relu(theta + phi), gate.psi.weight, gate.psi.bias)
    expected = (
        F.interpolate(torch.sigmoid(q), size=(8, 8), mode="bilinear") if sub_sample > 1 else torch.sigmoid(q)
    )
    assert_close("alpha", alpha, expected, torch.float32)


def test_grid_attention_gate_with_a_zero_gating_signal_depends_only_on_x():
    torch.manual_seed(0)
    gate = GridAttentionGate(GridAttentionGateConfig(4, 8, sub_sample=1))
    x, zero = torch.randn(3, 4, 6, 6), torch.zeros(3, 8, 3, 3)
    _, alpha = gate(x, zero)
    with torch.no_grad():
        gate.phi.weight.normal_()  # W_g changes: with g = 0 only its bias b is left
    _, alpha_again = gate(x, zero)
    assert torch.equal(alpha, alpha_again)
    b = gate.phi.bias.view(1, -1, 1, 1)
    expected = torch.sigmoid(gate.psi(F.relu(gate.theta(x) + b)))
    assert_close("alpha(x) with g = 0", alpha, expected, torch.float32)
    _, other = gate(x, torch.randn(3, 8, 3, 3))
    assert not torch.allclose(alpha, other)  # a real gating signal does move the gate


def test_grid_attention_gate_refuses_bad_input():
    gate = GridAttentionGate(GridAttentionGateConfig(4, 8))
    x, g = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"x must have rank 4 \(B, C, H, W\), got shape \(4, 8, 8\)"):
        gate(x[0], g)
    with pytest.raises(ValueError, match=r"g \(the gating signal\) must have 8 channels"):
        gate(x, g[:, :3])
    with pytest.raises(ValueError, match="share the batch size"):
        gate(x, g[:1])
    with pytest.raises(TypeError, match="floating-point"):
        gate(x.long(), g)
    with pytest.raises(ValueError, match="smaller than sub_sample"):
        gate(torch.randn(2, 4, 1, 1), g)
    with pytest.raises(ValueError, match="x_channels must be a positive int, got 0"):
        GridAttentionGateConfig(0, 8)


# class-probability self-gate ---------------------------------------------------------------------------
def test_class_prob_gate_is_one_minus_background():
    torch.manual_seed(0)
    gate = ClassProbGate(ClassProbGateConfig(channels=6, n_classes=4))
    h = torch.randn(2, 6, 5, 7)
    out, a, probs = gate(h)
    assert out.shape == h.shape and a.shape == (2, 1, 5, 7) and probs.shape == (2, 4, 5, 7)
    assert_close("probs sum to 1", probs.sum(dim=1), torch.ones(2, 5, 7), torch.float32)
    assert_close("a = 1 - P(background)", a, 1 - probs[:, :1], torch.float32)
    assert a.min() >= 0 and a.max() <= 1
    assert_close("out = conv3x3(h) * a", out, gate.conv(h) * a, torch.float32)


def test_class_prob_gate_with_no_background_passes_the_conv():
    gate = ClassProbGate(ClassProbGateConfig(channels=3, n_classes=2))
    with torch.no_grad():  # P(background) = 0 everywhere: the gate is 1 and the block is its conv
        gate.classifier.weight.zero_()
        gate.classifier.bias.copy_(torch.tensor([-1e4, 0.0]))
    h = torch.randn(2, 3, 4, 4)
    out, a, _ = gate(h)
    assert torch.equal(a, torch.ones_like(a))
    assert_close("out", out, gate.conv(h), torch.float32)


def test_class_prob_gate_refuses_bad_input():
    gate = ClassProbGate(ClassProbGateConfig(channels=3, n_classes=2))
    with pytest.raises(ValueError, match=r"h must have 3 channels at dim 1"):
        gate(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="rank 4"):
        gate(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"n_classes must be an int >= 2 \(background \+ one\), got 1"):
        ClassProbGateConfig(channels=3, n_classes=1)


# feature-selection gate --------------------------------------------------------------------------------
def test_feature_selection_gate_starts_near_one_half_and_scales_channels():
    torch.manual_seed(0)
    gate = FeatureSelectionGate(FeatureSelectionGateConfig(32))
    bound = math.sqrt(6 / 33)  # Xavier's bound for a (1, 32) weight
    assert gate.weight.abs().max() <= bound
    assert (gate.gate() - 0.5).abs().max() <= torch.sigmoid(torch.tensor(bound)) - 0.5 + 1e-7
    x = torch.randn(2, 32, 3, 3)
    assert_close("FSG", gate(x), x * gate.gate().view(1, -1, 1, 1), torch.float32)
    tokens = FeatureSelectionGate(FeatureSelectionGateConfig(32, channel_dim=-1))
    t = torch.randn(2, 5, 32)
    assert_close("HAG on (B, T, C)", tokens(t), t * tokens.gate(), torch.float32)
    with torch.no_grad():
        gate.weight.zero_()  # w = 0: every channel at exactly one half
    assert torch.equal(gate(x), x * 0.5)


def test_feature_selection_gate_refuses_bad_input():
    gate = FeatureSelectionGate(FeatureSelectionGateConfig(4))
    with pytest.raises(
        ValueError, match=r"x must have 4 channels at dim 1 \(B, C, \.\.\.\), got shape \(2, 3, 5\)"
    ):
        gate(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        gate(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="channel_dim must be 1"):
        FeatureSelectionGateConfig(4, channel_dim=2)


# gated ABMIL + MHIM -----------------------------------------------------------------------------------
def test_gated_abmil_weights_sum_to_one_and_pool_the_bag():
    torch.manual_seed(0)
    pool = GatedAttentionPooling(GatedAttentionPoolingConfig(d_model=8, d_attn=6))
    h = torch.randn(3, 10, 8)
    z, a = pool(h)
    assert z.shape == (3, 8) and a.shape == (3, 10) and a.min() >= 0
    assert_close("sum a = 1", a.sum(dim=1), torch.ones(3), torch.float32)
    scores = pool.w(torch.tanh(pool.V(h)) * torch.sigmoid(pool.U(h))).squeeze(-1)
    assert_close("a = softmax(w^T (tanh(V h) * sigmoid(U h)))", a, scores.softmax(dim=1), torch.float32)
    assert_close("z = sum a h", z, torch.einsum("bn,bnd->bd", a, h), torch.float32)
    perm = torch.randperm(10)
    z_perm, a_perm = pool(h[:, perm])
    assert_close("a permutes with the bag", a_perm, a[:, perm], torch.float32)
    assert_close("z is permutation invariant", z_perm, z, torch.float32)
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[:, :4] = False
    z_kept, a_kept = pool(h, keep)
    assert torch.equal(a_kept[:, :4], torch.zeros(3, 4))
    assert_close("masked = the bag without them", z_kept, pool(h[:, 4:])[0], torch.float32)


def test_gated_abmil_refuses_bad_input():
    pool = GatedAttentionPooling(GatedAttentionPoolingConfig(d_model=8))
    h = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"h must have rank 3 \(B, N, d_model\)"):
        pool(h[0])
    with pytest.raises(ValueError, match="h must have 8 features"):
        pool(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(2, 5\)"):
        pool(h, torch.ones(2, 5))
    with pytest.raises(ValueError, match="keep at least one per bag"):
        pool(h, torch.zeros(2, 5, dtype=torch.bool))


def test_hard_instance_mask_masks_the_teachers_top_instances():
    torch.manual_seed(0)
    attention = torch.rand(4, 50).softmax(dim=1)
    top5 = attention.topk(5, dim=1).indices
    keep = hard_instance_mask(attention, high_ratio=0.1, high_keep=1.0)  # no random share: exactly the top
    masked = [set((~keep[b]).nonzero().flatten().tolist()) for b in range(4)]
    assert masked == [set(top5[b].tolist()) for b in range(4)]
    generator = torch.Generator().manual_seed(1)
    keep = hard_instance_mask(attention, high_ratio=0.1, high_keep=0.5, random_ratio=0.2, generator=generator)
    top10 = attention.topk(10, dim=1).indices  # ceil(50 * 0.1 / 0.5) candidates, half of them masked
    for b in range(4):
        high = set((~keep[b]).nonzero().flatten().tolist()) & set(top10[b].tolist())
        assert len(high) >= 5
        assert int((~keep[b]).sum()) == 5 + round(45 * 0.2)  # the high ones, then 20% of the remaining 45
    assert hard_instance_mask(attention, high_ratio=0.0).all()  # all ratios 0: the baseline student


def test_hard_instance_mask_refuses_bad_ratios():
    attention = torch.rand(2, 8)
    with pytest.raises(ValueError, match=r"high_ratio must be a number in \[0, 1\), got 1.5"):
        hard_instance_mask(attention, high_ratio=1.5)
    with pytest.raises(ValueError, match=r"high_keep must be a number in \(0, 1\]"):
        hard_instance_mask(attention, high_keep=0.0)
    with pytest.raises(ValueError, match="rank 2"):
        hard_instance_mask(attention[0])


def test_ema_teacher_and_consistency_loss():
    torch.manual_seed(0)
    student = GatedAttentionPooling(GatedAttentionPoolingConfig(4))
    teacher = GatedAttentionPooling(GatedAttentionPoolingConfig(4))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, momentum=1.0)  # momentum 1 freezes the teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ema_update(teacher, student, momentum=0.0)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        ema_update(teacher, student, momentum=1.5)
    zt, zs = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    expected = -(torch.softmax(zt / 0.1, -1) * torch.log_softmax(zs / 1.0, -1)).sum(-1).mean()
    assert_close("SoftCE", consistency_loss(zt, zs), expected, torch.float32)
    with pytest.raises(ValueError, match="share one shape"):
        consistency_loss(zt, zs[:2])
