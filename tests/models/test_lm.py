"""The pattern LM: pattern parsing, config errors, internals, generate() with states == recomputation,
save/load round trip, init."""

import math

import pytest
import torch

from gatelab.lab.models.lm import LM, LMConfig, parse_pattern


def small(**overrides) -> LM:
    options = {"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, "seed": 0}
    return LM(LMConfig(**{**options, **overrides})).eval()


def test_parse_pattern_repeats_to_depth():
    assert parse_pattern("softmax*4", 4) == ["softmax"] * 4
    assert parse_pattern("softmax", 3) == ["softmax"] * 3
    assert parse_pattern("softmax*2", 6) == ["softmax"] * 6


def test_parse_pattern_hybrid_unit():
    import gatelab

    keys = {s.key for s in gatelab.list_mechanisms(causal=True) if s.family != "gate"}
    other = next((k for k in sorted(keys) if k != "softmax"), "softmax")
    assert parse_pattern(f"{other}*3,softmax", 8) == ([other] * 3 + ["softmax"]) * 2


@pytest.mark.parametrize(
    "pattern, n_layers, message",
    [
        ("softmax*3", 4, "multiple"),
        ("no_such_mixer", 2, "unknown mechanism"),
        ("softmax*0", 2, "positive int"),
        ("softmax,,softmax", 2, "empty entry"),
        ("", 2, "non-empty"),
    ],
)
def test_parse_pattern_errors(pattern, n_layers, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern, n_layers)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        LMConfig(vocab_size=0)
    with pytest.raises(TypeError, match="valid options"):  # an option the mixer does not accept
        LM(LMConfig(mixer_options={"softmax": {"no_such_option": 1}}))
    with pytest.raises(ValueError, match="unknown mechanism"):
        LMConfig(mixer_options={"sofmax": {"rope": False}})


def test_mixer_options_reach_the_mixer():
    model = small(mixer_options={"*": {"qk_norm": True}, "softmax": {"rope": False}})
    mixer = model.blocks[0].mixer
    assert mixer.config.qk_norm is True and mixer.config.rope is False


def test_depth_dependent_mixers_get_their_layer_index():
    model = LM(LMConfig(d_model=32, n_layers=3, n_heads=2, pattern="softmax,lightning*2"))
    configs = [block.mixer.config for block in model.blocks[1:]]
    assert [(c.layer_idx, c.n_layers) for c in configs] == [(1, 3), (2, 3)]
    decays = [block.mixer.log_decay for block in model.blocks[1:]]
    assert (decays[1] > decays[0]).all()  # deeper layers forget more slowly (TransNormerLLM)


def test_forward_shapes_and_internals():
    model = small(n_layers=3)
    idx = torch.randint(0, 50, (3, 11))
    logits, states, internals = model(idx, return_internals=True)
    assert logits.shape == (3, 11, 50) and len(states) == 3
    assert (
        len(internals["hidden"]) == 4 and len(internals["block_out"]) == 3 and len(internals["mixers"]) == 3
    )
    for i in range(3):  # each block's output is exactly what it added to the residual stream
        torch.testing.assert_close(
            internals["hidden"][i] + internals["block_out"][i], internals["hidden"][i + 1]
        )
    attn = internals["mixers"][0]["attn"]  # (B, H, T, S)
    assert attn.shape == (3, 2, 11, 11)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 11))
    plain, _ = model(idx)
    torch.testing.assert_close(plain, logits)


def test_forward_errors():
    model = small()
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="states"):
        model(torch.zeros(1, 3, dtype=torch.long), states=[None])


def test_generate_equals_argmax_of_full_recomputation():
    model = small()
    prompt = torch.randint(0, 50, (3, 5))
    out = model.generate(prompt, max_new_tokens=9)
    assert out.shape == (3, 14) and torch.equal(out[:, :5], prompt)
    ref = prompt
    with torch.no_grad():
        for _ in range(9):  # recompute the whole prefix every step
            logits, _ = model(ref)
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_sampling_is_seeded_and_respects_top_k():
    model = small()
    prompt = torch.randint(0, 50, (2, 4))
    a = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with torch.no_grad():  # every sampled token is among the 3 most likely given its prefix
        logits, _ = model(a[:, :-1])
    top3 = logits[:, 3:].topk(3, dim=-1).indices  # predictions for positions 4..9
    assert (top3 == a[:, 4:, None]).any(-1).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 100)


def test_save_load_round_trip(tmp_path):
    model = small(mixer_options={"softmax": {"qk_norm": True}})
    model.save(tmp_path / "m")
    loaded = LM.load(tmp_path / "m").eval()
    assert loaded.config == model.config
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    with pytest.raises(FileNotFoundError, match="LM.save"):
        LM.load(tmp_path / "missing")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert "head.weight" not in tensors  # tied: stored once, as the embedding
    assert loaded.head.weight is loaded.embed.weight
    untied = small(tie_embeddings=False)
    untied.save(tmp_path / "u")
    reloaded = LM.load(tmp_path / "u")
    assert "head.weight" in load_file(tmp_path / "u" / "model.safetensors")
    assert torch.equal(reloaded.head.weight, untied.head.weight)
    assert reloaded.head.weight is not reloaded.embed.weight
    del tensors["embed.weight"]
    with pytest.raises(RuntimeError, match="missing"):
        model.load_tensors(tensors)


def test_seeded_init_is_reproducible_and_gpt2_scaled():
    a, b = small(n_layers=4), small(n_layers=4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.embed.weight, small(seed=1).embed.weight)
    # residual projections are scaled by 1/sqrt(2 n_layers); the others are N(0, 0.02)
    big = LM(LMConfig(vocab_size=64, d_model=256, n_layers=4, n_heads=4, seed=0))
    assert big.blocks[0].mlp.gate_up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert big.blocks[0].mixer.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert big.num_parameters() == sum(p.numel() for p in big.parameters())
    assert big.num_parameters(exclude_embeddings=True) == big.num_parameters() - 64 * 256


def _causal_specs():
    import gatelab

    return [s for s in gatelab.list_mechanisms(causal=True) if s.family != "gate"]


@pytest.mark.parametrize("spec", _causal_specs(), ids=lambda s: s.key)
def test_every_causal_mixer_builds_an_lm_whose_decoding_matches_the_full_pass(spec):
    """Any registered causal mixer works in the LM with no change to it: token-by-token decoding with the
    states gives the logits of the full forward pass."""
    from helpers import check_lm_decodes_like_the_full_pass

    options = {spec.key: spec.extra.get("test_options", {})}
    model = LM(
        LMConfig(
            vocab_size=32, d_model=64, n_layers=2, n_heads=4, pattern=spec.key, mixer_options=options, seed=0
        )
    )
    check_lm_decodes_like_the_full_pass(model.eval(), torch.randint(0, 32, (2, 10)), 4, spec.key)
