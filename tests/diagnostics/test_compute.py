"""FLOP counts of the lab's LMs (gatelab.routers.flops' definitions), the routers' routing summary read from
internals["route"], and decode timing's input checks."""

import pytest
import torch

from gatelab.lab.diagnostics.compute import (
    compute_summary,
    decode_ms_per_token,
    mixer_flops_per_token,
    model_flops_per_token,
    routing_summary,
)
from gatelab.lab.models.lm import LM, LMConfig

D, H, L, VOCAB = 16, 2, 2, 40


def _lm(pattern, **mixer_options):
    options = {pattern: mixer_options} if mixer_options else {}
    return LM(LMConfig(vocab_size=VOCAB, d_model=D, n_layers=L, n_heads=H, max_seq_len=32, pattern=pattern,
                       mixer_options=options, seed=0)).eval()  # fmt: skip


def _rest(model) -> float:
    """2 FLOPs per weight of the MLPs and the LM head (embedding: a lookup)."""
    mlp = sum(p.numel() for b in model.blocks for p in b.mlp.parameters() if p.ndim >= 2)
    return 2.0 * (mlp + VOCAB * D)


def test_softmax_lm_counts_projections_and_causal_attention():
    model = _lm("softmax")
    T = 12
    attention = 4 * H * (D // H) * (T + 1) / 2
    projections = 2 * 4 * D * D
    assert model_flops_per_token(model, T) == pytest.approx(L * (projections + attention) + _rest(model))


def test_gated_deltanet_counts_its_state_and_no_attention():
    model = _lm("gated_deltanet")
    mixer = model.blocks[0].mixer
    heads, K, V = mixer.state_dims()
    matrices = sum(p.numel() for p in mixer.parameters() if p.ndim >= 2)
    assert mixer_flops_per_token(mixer, 12) == 2 * matrices + 7 * heads * K * V
    assert mixer_flops_per_token(mixer, 12) == mixer_flops_per_token(mixer, 30)  # linear: length-free


def test_sliding_window_is_cheaper_than_softmax_past_the_window():
    assert model_flops_per_token(_lm("sliding_window", window=4, sinks=1), 24) < model_flops_per_token(
        _lm("softmax"), 24
    )


def test_routing_summary_reads_the_routers_internals():
    inputs = torch.randint(0, VOCAB, (3, 10))
    assert routing_summary(_lm("softmax"), inputs) is None
    summary = routing_summary(_lm("flux", window=4, pool_size=2), inputs)
    assert summary["expensive_fraction"] == 1.0 and summary["unit"] == "layers"  # init: full attention
    sparse = routing_summary(_lm("flux", window=4, route="sparse"), inputs)
    assert sparse["expensive_fraction"] == 0.0 and sparse["per_layer"] == [0.0, 0.0]


def test_compute_summary_of_a_router_lm():
    model = _lm("flux", window=4, route="sparse")
    batches = [(torch.randint(0, VOCAB, (2, 12)), None)]
    summary = compute_summary(model, batches)
    assert summary["route"]["expensive_fraction"] == 0.0 and summary["seq_len"] == 12
    assert summary["flops_per_token"] < model_flops_per_token(_lm("flux", window=4, route="full"), 12)
    assert summary["decode_ms_per_token"] > 0
    with pytest.raises(ValueError, match="at least one batch"):
        compute_summary(model, [])
    with pytest.raises(ValueError, match="prompt_len must be in"):
        decode_ms_per_token(model, batches[0][0], 12)
