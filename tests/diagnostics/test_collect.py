import math

import pytest
import torch

from gatelab.lab.diagnostics import diagnose, uniform_entropy, uniform_first_token_share


def test_diagnose_on_layers_with_known_internals(tiny_lm, batches):
    result = diagnose(tiny_lm, batches)
    T = batches[0][0].shape[1]
    assert result["layers"] == ["sink", "uniform", "none"]
    assert result["n_sequences"] == 6
    # layer 0 sends everything to the first token, layer 1 is uniform, layer 2 has no attention matrix
    assert result["sink_share"][0] == pytest.approx([1.0, 1.0])
    assert result["sink_share"][1] == pytest.approx([uniform_first_token_share(T)] * 2)
    assert result["sink_share"][2] is None
    assert result["sink_share_uniform"] == pytest.approx(uniform_first_token_share(T))
    assert result["attn_entropy_layer"][0] == pytest.approx(0.0, abs=1e-6)
    assert result["attn_entropy_layer"][1] == pytest.approx(uniform_entropy(T), rel=1e-5)
    assert result["attn_entropy_layer"][2] is None
    # gates: only layer 1 has them; half at 0.05, half at 0.5
    assert result["gate_mean"] == [None, pytest.approx(0.275), None]
    assert result["gate_frac_below"] == [None, pytest.approx(0.5), None]
    # activations: one entry per hidden state h_0..h_3, one per block for the block measures
    assert len(result["max_activation"]) == 4 and len(result["block_inf_norm"]) == 3
    with torch.no_grad():
        _, _, internals = tiny_lm(torch.cat([b[0] for b in batches]), return_internals=True)
    for i, h in enumerate(internals["hidden"]):
        assert result["max_activation"][i] == pytest.approx(float(h.abs().max()), rel=1e-6)
    for i, out in enumerate(internals["block_out"]):
        expected = out.abs().amax(dim=(1, 2)).mean()
        assert result["block_inf_norm"][i] == pytest.approx(float(expected), rel=1e-5)
    summary = result["summary"]
    assert summary["sink_share"] == pytest.approx(1.0)
    assert summary["max_inf_norm"] == pytest.approx(max(result["block_inf_norm"]))
    assert summary["gate_mean"] == pytest.approx(0.275)
    assert summary["w8a8_gap"] == pytest.approx(result["loss_w8a8"] - result["loss_fp32"])


def test_diagnose_without_attention_reports_none(tiny_lm_class, batches):
    result = diagnose(tiny_lm_class(kinds=("none", "none")), batches, quantization=False)
    assert result["sink_share"] == [None, None]
    assert result["summary"]["sink_share"] is None and result["summary"]["gate_mean"] is None
    assert "loss_w8a8" not in result


def test_diagnose_restores_training_mode(tiny_lm, batches):
    tiny_lm.train()
    diagnose(tiny_lm, batches, quantization=False)
    assert tiny_lm.training
    with pytest.raises(ValueError, match="at least one batch"):
        diagnose(tiny_lm, [])


def test_collector_takes_hooked_modules_and_bidirectional_attention():
    """One layer with two hooked modules (as forward hooks on a transformers layer give): the layer's
    inf-norm is the max over its modules, its kurtosis the mean, and each module's pair is kept."""
    from gatelab.lab.diagnostics import Collector, sequence_outlier_stats

    torch.manual_seed(0)
    h = [torch.randn(2, 6, 4), torch.randn(2, 6, 4)]
    modules = {"fc2": torch.randn(2, 6, 4) * 5, "norm": torch.randn(2, 6, 4)}
    attn = torch.full((2, 3, 6, 6), 1 / 6)  # bidirectional uniform
    collector = Collector(causal=False)
    collector.add(h, [modules], [{"attn": attn}])
    result = collector.result(["layer"])
    pairs = {name: [float(v.mean()) for v in sequence_outlier_stats(x)] for name, x in modules.items()}
    assert result["modules"][0]["fc2"]["inf_norm"] == pytest.approx(pairs["fc2"][0], rel=1e-6)
    assert result["block_inf_norm"][0] == pytest.approx(max(p[0] for p in pairs.values()), rel=1e-6)
    assert result["block_kurtosis"][0] == pytest.approx(sum(p[1] for p in pairs.values()) / 2, rel=1e-6)
    assert result["sink_share_uniform"] == pytest.approx(1 / 6) and result["sink_share"][0] == pytest.approx(
        [1 / 6] * 3
    )
    assert result["attn_entropy_uniform"] == pytest.approx(math.log(6))
    with pytest.raises(ValueError, match="at least one batch"):
        Collector().result([])


BOS = 16


class PlantedBosLM(torch.nn.Module):
    """Three layers with planted attention: on the BOS keys only (spread evenly over those visible), on the
    first key only, and uniform over the visible keys."""

    layer_keys = ["bos", "first", "uniform"]

    def __init__(self, n_heads=2):
        super().__init__()
        self.n_heads = n_heads
        self.embed = torch.nn.Embedding(BOS + 1, 4)

    def forward(self, idx, states=None, *, return_internals=False):
        B, T = idx.shape
        h = self.embed(idx)
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        on_bos = (causal & (idx == BOS)[:, None, :]).float()  # (B, T, T): query t, key s
        on_bos = (on_bos / on_bos.sum(-1, keepdim=True))[:, None].expand(B, self.n_heads, T, T)
        first = torch.zeros(B, self.n_heads, T, T)
        first[..., 0] = 1.0
        uniform = (causal / causal.sum(-1, keepdim=True)).expand(B, self.n_heads, T, T)
        mixers = [{"attn": on_bos}, {"attn": first}, {"attn": uniform}]
        logits = h @ self.embed.weight.T
        internals = {"hidden": [h] * 4, "block_out": [h] * 3, "mixers": mixers}
        return (logits, [None] * 3, internals) if return_internals else (logits, [None] * 3)


def test_bos_share_and_first_token_share_are_measured_apart():
    T = 10
    inputs = torch.randint(0, BOS, (3, T), generator=torch.Generator().manual_seed(0))
    inputs[:, 0] = BOS
    inputs[:, 5] = BOS  # a document starts inside the window
    batches = [(inputs, inputs), (inputs[:2], inputs[:2])]
    result = diagnose(PlantedBosLM(), batches, quantization=False, bos_token=BOS)
    assert result["bos_token"] == BOS and result["layers"] == ["bos", "first", "uniform"]
    # the BOS-only layer: all on BOS keys, but the first key holds only half of it once the second BOS is seen
    assert result["bos_share"][0] == pytest.approx([1.0, 1.0])
    assert result["sink_share"][0] == pytest.approx([(5 * 1.0 + 5 * 0.5) / T] * 2)
    # the first-token layer: position 0 holds BOS, so both shares are 1; nothing on position 1
    assert result["bos_share"][1] == result["sink_share"][1] == pytest.approx([1.0, 1.0])
    assert result["first_content_share"][1] == pytest.approx([0.0, 0.0])
    # uniform attention: its BOS share is the uniform baseline, its position-1 share the mean of 1 / (t + 1)
    expected_bos = sum((1 if t < 5 else 2) / (t + 1) for t in range(T)) / T
    assert result["bos_share_uniform"] == pytest.approx(expected_bos)
    assert result["bos_share_layer"][2] == pytest.approx(expected_bos)
    assert result["first_content_share_layer"][2] == pytest.approx(sum(1 / (t + 1) for t in range(1, T)) / T)
    summary = result["summary"]
    assert summary["bos_share"] == pytest.approx(1.0) and summary["sink_share"] == pytest.approx(1.0)
    assert summary["bos_share_uniform"] == pytest.approx(expected_bos)
    assert summary["first_content_share"] == pytest.approx(result["first_content_share_layer"][2])


def test_bos_shares_are_none_without_a_bos_token(tiny_lm, batches):
    result = diagnose(tiny_lm, batches, quantization=False)
    assert result["bos_token"] is None and result["bos_share"] == [None, None, None]
    assert result["bos_share_layer"] == [None] * 3 and result["first_content_share"] == [None] * 3
    summary = result["summary"]
    assert summary["bos_share"] is None and summary["bos_share_uniform"] is None
    assert summary["first_content_share"] is None and summary["sink_share"] == pytest.approx(1.0)


def test_collector_with_a_bos_token_needs_the_inputs():
    from gatelab.lab.diagnostics import Collector

    h = [torch.randn(2, 6, 4)] * 2
    attn = {"attn": torch.full((2, 1, 6, 6), 1 / 6)}
    with pytest.raises(ValueError, match="inputs must be the \\(B, T\\) token ids with B=2"):
        Collector(bos_token=3).add(h, [h[0]], [attn])
    with pytest.raises(ValueError, match="one key per input token: attn has S=8 keys, inputs T=6"):
        Collector(bos_token=3).add(h, [h[0]], [{"attn": torch.full((2, 1, 6, 8), 1 / 8)}], torch.zeros(2, 6))
