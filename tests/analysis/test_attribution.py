"""Direct logit attribution sums to the logit difference; a planted gate head is found by interchange while
its DLA is zero (How Alignment Routes' motif, built by hand)."""

import pytest
import torch

from gatelab.analysis import activation_patching, direct_logit_attribution, find_gate_heads, gate_values
from gatelab.lab.analyze_planted import GATE_CLEAN, GATE_CORRUPT, planted_gate, planted_gate_model
from gatelab.lab.models.lm import LM, LMConfig


def dla_sum(result):
    heads = result["heads"].nan_to_num(0).sum(dim=(1, 2))
    return (
        heads + result["embed"] + result["bias"].sum(1) + result["mlp"].nan_to_num(0).sum(1) + result["other"]
    )


@pytest.mark.parametrize("pattern", ["softmax", "gated_softmax", "gla"])
def test_dla_sums_to_the_logit_difference(pattern):
    options = {"mixer_options": {"*": {"bias": True}}} if pattern == "softmax" else {}
    lm = LM(LMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, pattern=pattern, seed=0, **options))
    with torch.no_grad():
        for block in lm.blocks if pattern == "softmax" else []:
            block.mixer.o_proj.bias.normal_()  # zero at init: make the bias term visible
    idx = torch.randint(16, (4, 9))
    target, other = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    result = direct_logit_attribution(lm.eval(), idx, target, other, position=-2)
    assert result["heads"].shape == (4, 2, 2)
    assert torch.allclose(dla_sum(result), result["total"], atol=1e-5, rtol=1e-5)
    if pattern == "softmax":
        assert result["bias"].abs().sum() > 0  # the output projection's bias is a term of its own


def test_dla_sums_to_the_logit_difference_on_a_patched_transformers_model():
    transformers = pytest.importorskip("transformers")
    from gatelab.hf import patch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=64,
    )
    model = patch(transformers.AutoModelForCausalLM.from_config(config).eval(), "softmax")
    idx = torch.randint(64, (2, 6))
    result = direct_logit_attribution(model, idx, 3, 4)
    assert result["heads"].shape == (2, 2, 4)
    assert torch.allclose(dla_sum(result), result["total"], atol=1e-5, rtol=1e-5)


def test_interchange_finds_the_planted_gate_head_while_its_dla_is_zero():
    lm = planted_gate_model()
    clean, corrupt = GATE_CLEAN, GATE_CORRUPT

    def metric(out):
        return (out[0][:, -1, 1] - out[0][:, -1, 2]).mean()

    patched = activation_patching(lm, lambda: lm(clean), lambda: lm(corrupt), metric, per="head")
    effect = patched["patched"] - patched["corrupt"]
    dla = direct_logit_attribution(lm, clean, 1, 2)
    heads_dla = dla["heads"].mean(0)
    assert heads_dla[0, 0] == 0  # channel 8 is orthogonal to every unembedding row
    assert effect[0, 0] > 0.5 * effect.max() and heads_dla[0, 1] > 0.1 * dla["total"].mean()
    assert effect[1].abs().max() == 0  # layer 1's heads are all zero
    found = find_gate_heads(effect, heads_dla, total=float(dla["total"].mean()))
    assert [(row["layer"], row["head"]) for row in found] == [(0, 0)]
    assert planted_gate()["found"] == found  # the README's validation computes the same


def test_gate_values_are_per_head_means_and_nan_without_a_gate():
    lm = LM(
        LMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, pattern="gated_softmax", seed=0)
    ).eval()
    idx = torch.randint(16, (2, 5))
    _, _, internals = lm(idx, return_internals=True)
    values = gate_values(lm, lambda: lm(idx))
    gate = internals["mixers"][1]["gate"]  # (B, T, H, D) elementwise gate
    assert torch.allclose(values[1], gate.transpose(0, 2).reshape(2, -1).mean(-1))
    plain = LM(LMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, seed=0)).eval()
    assert torch.isnan(gate_values(plain, lambda: plain(idx))).all()


def test_find_gate_heads_checks_its_inputs():
    with pytest.raises(ValueError, match="one shape"):
        find_gate_heads(torch.zeros(2, 2), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="dla_share"):
        find_gate_heads(torch.zeros(2, 2), torch.zeros(2, 2), 1.0, dla_share=2.0)
