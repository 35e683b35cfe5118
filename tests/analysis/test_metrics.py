"""WAAD / FAI, AttentionInfluence, probes and the CARVE contrast against hand computations."""

import pytest
import torch

from gatelab.analysis import (
    Site,
    attention_influence,
    capture,
    cliff,
    contrast,
    contrast_mask,
    fai,
    fit_probe,
    head_groups,
    mean_backward_distance,
    probe_accuracy,
    probe_by_position,
    sample_losses,
    uniform_attention,
    waad,
)
from gatelab.lab.models.lm import LM, LMConfig


def uniform_causal(T):
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]


def test_identity_attention_has_zero_distance_and_waad():
    eye = torch.eye(12).expand(1, 3, 12, 12)
    assert torch.equal(waad(eye), torch.zeros(1, 3, 12))
    assert torch.equal(mean_backward_distance(eye), torch.zeros(3))


def test_waad_of_uniform_causal_attention_is_the_closed_form():
    T, W = 15, 4
    expected = torch.tensor([sum(min(k, W) for k in range(t + 1)) / (t + 1) for t in range(T)])
    torch.testing.assert_close(waad(uniform_causal(T), window=W), expected)
    # mean backward distance of uniform attention: t / 2 at query t
    assert mean_backward_distance(uniform_causal(T)[None, None]).item() == pytest.approx((T - 1) / 4)


def test_waad_reads_bottom_right_aligned_maps():
    attn = torch.zeros(2, 5)  # 2 queries at positions 3 and 4 of 5 keys, both on key 0
    attn[:, 0] = 1
    torch.testing.assert_close(waad(attn, window=10), torch.tensor([3.0, 4.0]))


def test_fai_of_a_constant_column_is_that_constant_and_nan_where_undefined():
    T = 30
    attn = torch.zeros(T, T)
    attn[:, 2] = 0.25
    result = fai(attn, low=3, high=10)
    assert result[2].item() == pytest.approx(0.25)
    assert torch.isnan(result[T - 3 :]).all()  # no t >= s + 3 inside the sequence
    response = torch.arange(T) >= 20
    by_hand = attn[20:13, 2]  # t in [5, 12] and t >= 20: empty -> NaN
    assert by_hand.numel() == 0 and torch.isnan(fai(attn, 3, 10, positions=response)[2])
    assert fai(attn, 3, 20, positions=response)[2].item() == pytest.approx(0.25)


def test_head_groups_split_by_distance():
    local, far = head_groups(torch.tensor([5.0, 0.1, 3.0, 9.0, 0.5, 2.0, 7.0, 1.0, 4.0, 6.0]), share=0.3)
    assert sorted(local.tolist()) == [1, 4, 7] and sorted(far.tolist()) == [3, 6, 9]


def test_contrast_is_invariant_to_shared_noise_and_monotone_under_uniform_general():
    task, noise = torch.rand(2, 20) + 0.01, torch.rand(20) + 0.5
    general = torch.full((2, 20), 0.05)
    assert torch.equal(contrast_mask(contrast(task, general), 0.3), contrast_mask(task, 0.3))
    shared = contrast(task * noise, general * noise, eps=1e-12)
    torch.testing.assert_close(shared, contrast(task, general, eps=1e-12))
    assert contrast_mask(task, 0.25).sum(-1).tolist() == [5, 5]


def tiny(pattern="softmax"):
    return LM(LMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, pattern=pattern, seed=0)).eval()


def test_uniform_attention_equals_a_head_whose_queries_are_zero():
    """Zero queries give every visible key the score 0: uniform attention over the causal prefix, the
    AttentionInfluence mask computed by the model itself."""
    lm, idx = tiny(), torch.randint(16, (3, 8))
    got = uniform_attention(lm, lambda: lm(idx), {1: [0]})[0]
    with torch.no_grad():
        lm.blocks[1].mixer.q_proj.weight[:8] = 0
        expected = lm(idx)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    _, cache = capture(lm, lambda: lm(idx), [Site("attn", 1)])
    torch.testing.assert_close(cache[Site("attn", 1)][:, 0], uniform_causal(8).expand(3, 8, 8))


def test_attention_influence_is_the_relative_loss_change():
    lm, idx = tiny(), torch.randint(16, (3, 8))
    targets = torch.randint(16, (3, 8))
    targets[:, :2] = -100
    assert torch.equal(attention_influence(lm, idx, targets, {}), torch.zeros(3))
    assert torch.equal(attention_influence(lm, idx, targets, {0: []}), torch.zeros(3))
    score = attention_influence(lm, idx, targets, {0: [1], 1: [0]})
    base = sample_losses(lm(idx)[0], targets)
    masked = sample_losses(uniform_attention(lm, lambda: lm(idx), {0: [1], 1: [0]})[0], targets)
    torch.testing.assert_close(score, (masked - base) / base)


def test_uniform_attention_refuses_a_gated_mixer():
    lm = tiny("gated_softmax")
    with pytest.raises(TypeError, match="plain causal softmax"):
        uniform_attention(lm, lambda: lm(torch.zeros(1, 3, dtype=torch.long)), {0: [0]})


def test_probe_separates_clusters_and_the_cliff_is_the_largest_late_drop():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=g)
    labels = (torch.arange(200) % 2).float()
    features = torch.randn(200, 8, generator=g) + 3 * (2 * labels[:, None] - 1) * direction
    probe = fit_probe(features[:100], labels[:100])
    assert probe_accuracy(probe, features[100:], labels[100:]) == 1.0
    scores = torch.tensor([0.9, 0.95, 0.9, 0.8, 0.2, 0.3])
    assert cliff(scores, last=4).item() == pytest.approx(0.7)  # 0.9 -> 0.2
    assert cliff(scores, last=2).item() == pytest.approx(0.0)  # 0.2 -> 0.3 rises
    hidden = torch.randn(40, 3, 8, generator=g)
    hidden[:, 2] += 3 * (2 * labels[:40, None] - 1) * direction  # the label is readable at position 2 only
    accuracy = probe_by_position(hidden, labels[:40], torch.arange(40) < 30)
    assert accuracy[2] == 1.0 and accuracy[:2].max() < 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        fit_probe(features, labels + 1)
