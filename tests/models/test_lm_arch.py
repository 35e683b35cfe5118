"""The LM's architecture options (positions, norm, mlp; lm.ARCHITECTURES): the default is today's model,
each option changes the module as meant, decoding agrees with the full pass, save/load round-trips, and
the spec, compare and train CLI carry them."""

import argparse
import hashlib
import json
import math

import pytest
import torch
import torch.nn as nn

from gatelab.lab.models.lm import ARCHITECTURES, LM, GeluMLP, LMConfig, LMStates, SwiGLU, architecture
from gatelab.testing import TOLERANCE, assert_close


def small(**changes) -> LMConfig:
    options = {"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "seed": 0}
    return LMConfig(**{**options, **changes})


def test_the_default_lm_is_bit_identical_to_main():
    """The digest of this seeded LM's state_dict built by main before the architecture options existed."""
    model = LM(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, pattern="softmax,gla", seed=3))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == "34b12225c37bc8cffb0f66318ef932b84439aab22a32afa97e7ada08b11637b3"
    assert not hasattr(model, "pos_embed") and isinstance(model.norm, nn.RMSNorm)
    explicit = LM(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, pattern="softmax,gla", seed=3,
                           **architecture("llama")))  # fmt: skip
    for (name, a), b in zip(model.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), name


def test_each_option_changes_the_module_as_meant():
    model = LM(small(pattern="softmax,gla", **architecture("gpt2")))
    assert isinstance(model.pos_embed, nn.Embedding) and model.pos_embed.weight.shape == (64, 32)
    norms = [model.norm] + [n for b in model.blocks for n in (b.mixer_norm, b.mlp_norm)]
    assert all(isinstance(n, nn.LayerNorm) and n.eps == 1e-5 and n.bias is not None for n in norms)
    assert all(isinstance(b.mlp, GeluMLP) for b in model.blocks)
    assert model.blocks[0].mixer.config.rope is False  # softmax: RoPE off; gla has no rope field
    assert model.blocks[0].mlp.fc.weight.shape == (128, 32) and model.blocks[0].mlp.fc.bias is None
    assert LM(small(positions="none")).blocks[0].mixer.config.rope is False
    assert not hasattr(LM(small(positions="none")), "pos_embed")
    assert LM(small()).blocks[0].mixer.config.rope is True
    # GELU init: fc N(0, 0.02), proj scaled 1/sqrt(2 L); the position embedding N(0, 0.02)
    big = LM(LMConfig(vocab_size=64, d_model=256, n_layers=4, n_heads=4, mlp="gelu", positions="learned",
                      seed=0))  # fmt: skip
    assert big.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert big.pos_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert isinstance(LM(small(mlp="swiglu")).blocks[0].mlp, SwiGLU)


def test_the_gelu_mlp_counts_its_flops():
    from gatelab.lab.diagnostics.compute import model_flops_per_token

    swiglu, gelu = LM(small()), LM(small(mlp="gelu"))
    gelu_weights = 2 * 32 * 128  # fc + proj
    sw = swiglu.blocks[0].mlp
    diff = model_flops_per_token(gelu, 16) - model_flops_per_token(swiglu, 16)
    assert diff == pytest.approx(2 * 2 * (gelu_weights - sw.gate_up.weight.numel() - sw.down.weight.numel()))


def test_architecture_presets_and_errors():
    assert architecture("gpt2") == {"positions": "learned", "norm": "layer", "mlp": "gelu"}
    assert (
        architecture("llama")
        == ARCHITECTURES["llama"]
        == {"positions": "rope", "norm": "rms", "mlp": "swiglu"}
    )
    with pytest.raises(ValueError, match="arch must be one of llama, gpt2, got 'gpt3'"):
        architecture("gpt3")
    with pytest.raises(ValueError, match="positions must be one of rope, learned, none, got 'alibi'"):
        small(positions="alibi")
    with pytest.raises(ValueError, match="norm must be one of rms, layer, got 'batch'"):
        small(norm="batch")
    with pytest.raises(ValueError, match="'swiglu', 'gelu' or 'moe:<router>'"):
        small(mlp="relu")
    with pytest.raises(ValueError, match="apply to an MoE MLP; mlp is 'gelu'"):
        small(mlp="gelu", mlp_options={"n_experts": 2})
    with pytest.raises(ValueError, match="rope=True conflicts with positions='learned'"):
        small(positions="learned", mixer_options={"softmax": {"rope": True}})
    with pytest.raises(ValueError, match="rope=True conflicts with positions='none'"):
        small(positions="none", mixer_options={"*": {"rope": True}})
    small(positions="none", mixer_options={"softmax": {"rope": False}})  # explicit False is fine


COMBOS = [
    (p, n, m) for p in ("rope", "learned", "none") for n in ("rms", "layer") for m in ("swiglu", "gelu")
]


@pytest.mark.parametrize("positions,norm,mlp", COMBOS)
def test_decoding_matches_the_full_pass(positions, norm, mlp):
    """Step-by-step decoding and chunked prefill + steps give the full pass's logits (T=63, batch 3)."""
    model = LM(small(pattern="softmax,gla", positions=positions, norm=norm, mlp=mlp)).eval()
    idx = torch.randint(0, 50, (3, 63), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, states = model(idx)
        assert isinstance(states, LMStates) and states.position == 63
        steps, states = [], None
        for t in range(63):
            logits, states = model(idx[:, t : t + 1], states)
            steps.append(logits)
        assert states.position == 63
        chunked, states = [], None
        for lo, hi in ((0, 20), (20, 41), *((t, t + 1) for t in range(41, 63))):
            logits, states = model(idx[:, lo:hi], states)
            chunked.append(logits)
    assert_close(f"{positions}/{norm}/{mlp} step decode", torch.cat(steps, 1), full, torch.float32)
    assert_close(f"{positions}/{norm}/{mlp} chunked decode", torch.cat(chunked, 1), full, torch.float32)
    assert TOLERANCE[torch.float32] == 1e-4


def test_learned_positions_need_lm_states_and_fit_max_seq_len():
    model = LM(small(positions="learned", max_seq_len=16)).eval()
    idx = torch.randint(0, 50, (1, 10))
    _, states = model(idx)
    with pytest.raises(ValueError, match="must be the LMStates forward returned"):
        model(idx[:, :1], list(states))
    with pytest.raises(ValueError, match="10 tokens seen \\+ 7 new exceed max_seq_len \\(16\\)"):
        model(idx[:, :7], states)
    out = model.generate(idx, 6)  # prompt + new = max_seq_len
    assert out.shape == (1, 16)
    rope = LM(small()).eval()
    _, states = rope(idx)
    logits, _ = rope(idx[:, :1], list(states))  # a plain list: position 0, as before for rope
    assert logits.shape == (1, 1, 50)


def test_generate_equals_recomputation_with_gpt2():
    model = LM(small(**architecture("gpt2"))).eval()
    idx = torch.randint(0, 50, (2, 5))
    out = model.generate(idx, 6)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(out[:, t], model(out[:, :t])[0][:, -1].argmax(-1))


def test_save_load_round_trips_the_options_and_old_configs_load_as_defaults(tmp_path):
    model = LM(small(**architecture("gpt2")))
    model.save(tmp_path / "gpt2")
    loaded = LM.load(tmp_path / "gpt2")
    assert (loaded.config.positions, loaded.config.norm, loaded.config.mlp) == ("learned", "layer", "gelu")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    LM(small()).save(tmp_path / "old")  # a config.json written before the options existed
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    for name in ("positions", "norm"):
        del config[name]
    path.write_text(json.dumps(config))
    (tmp_path / "old" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest"):
        old = LM.load(tmp_path / "old")
    assert (old.config.positions, old.config.norm) == ("rope", "rms")


def test_export_refuses_the_gpt2_options(tmp_path):
    """Refused before transformers is imported: the refusals need no transformers."""
    from gatelab.hf.export import export_lm

    for option, value in (
        ("positions", "learned"),
        ("positions", "none"),
        ("norm", "layer"),
        ("mlp", "gelu"),
    ):
        with pytest.raises(ValueError, match=f"LMConfig.{option}='{value}' has no Llama/Qwen3 equivalent"):
            export_lm(LM(small(**{option: value})), tmp_path / option)


def test_variants_parse_the_architecture():
    from gatelab.lab.presets import PRESETS
    from gatelab.lab.spec import Variant, build, parse_variants

    v = Variant.parse("softmax[arch=gpt2]")
    assert v.name == "softmax[arch=gpt2]" and v.arch == architecture("gpt2")
    assert v.to_dict() == {"key": "softmax", "options": {}, "mlp": "gelu", "mlp_options": {},
                           "positions": "learned", "norm": "layer"}  # fmt: skip
    assert Variant.parse("softmax").to_dict() == {"key": "softmax", "options": {}}
    assert Variant.parse("softmax[positions=none]").arch == {
        "positions": "none",
        "norm": "rms",
        "mlp": "swiglu",
    }
    assert Variant.parse("softmax[norm=layer]").norm == "layer"
    assert Variant.parse("softmax[mlp=gelu]").mlp == "gelu"
    mixed = Variant.parse("softmax[arch=gpt2,mlp=moe:topk]")
    assert mixed.arch == {"positions": "learned", "norm": "layer", "mlp": "moe:topk"}
    with pytest.raises(ValueError, match="arch must be one of llama, gpt2, got 'gpt3'"):
        Variant.parse("softmax[arch=gpt3]")
    with pytest.raises(ValueError, match="positions must be one of rope, learned, none"):
        Variant.parse("softmax[positions=alibi]")
    assert Variant.parse("softmax").with_arch("llama").name == "softmax"
    assert Variant.parse("softmax").with_arch("gpt2").name == "softmax[arch=gpt2]"
    assert Variant.parse("softmax[name=base]").with_arch("gpt2").name == "base+gpt2"
    assert (
        Variant.parse("softmax").with_mlp("moe:topk").with_arch("gpt2").name
        == "softmax[arch=gpt2,mlp=moe:topk]"
    )
    with pytest.raises(ValueError, match="already chooses its architecture"):
        Variant.parse("softmax[norm=layer]").with_arch("gpt2")
    spec = PRESETS["quick"].run_spec("mqar", v, seed=0)
    assert (spec.positions, spec.norm, spec.mlp) == ("learned", "layer", "gelu")
    _, model, _ = build(spec)
    assert isinstance(model.norm, nn.LayerNorm) and model.blocks[0].mixer.config.rope is False
    with pytest.raises(ValueError, match=r"softmax\[rope=true,arch=gpt2\]: .*conflicts with positions"):
        PRESETS["quick"].run_spec("mqar", Variant.parse("softmax[rope=true,arch=gpt2]"), seed=0)
    assert [x.name for x in parse_variants("softmax,softmax[arch=gpt2]")] == ["softmax", "softmax[arch=gpt2]"]


def test_run_spec_checks_the_options():
    from gatelab.lab.spec import RunSpec

    with pytest.raises(ValueError, match="x: norm must be one of rms, layer"):
        RunSpec(task="mqar", name="x", norm="batch")
    with pytest.raises(ValueError, match="positions / norm are options of the LM"):
        RunSpec(task="digits", pattern="cnn", positions="learned")


def test_gatelab_train_takes_the_architecture_flags():
    from gatelab.commands.train import _add_arguments, run_spec

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    spec = run_spec(parser.parse_args([]))
    assert (spec.positions, spec.norm, spec.mlp) == ("rope", "rms", "swiglu")
    spec = run_spec(parser.parse_args(["--arch", "gpt2"]))
    assert (spec.positions, spec.norm, spec.mlp) == ("learned", "layer", "gelu")
    spec = run_spec(parser.parse_args(["--arch", "gpt2", "--positions", "none", "--mlp", "swiglu"]))
    assert (spec.positions, spec.norm, spec.mlp) == ("none", "layer", "swiglu")
    spec = run_spec(parser.parse_args(["--norm", "layer", "--mlp", "gelu"]))
    assert (spec.positions, spec.norm, spec.mlp) == ("rope", "layer", "gelu")


def test_compare_crosses_every_variant_with_each_architecture(tmp_path):
    import io

    from rich.console import Console

    from gatelab.lab.comparison import compare

    threads, console = torch.get_num_threads(), Console(file=io.StringIO())
    try:
        results = compare("quick", mixers="softmax", arch="gpt2,llama", tasks=["mqar"], steps=2, seeds=1,
                          device="cpu", out=tmp_path, threads=1, console=console)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    runs = {r["mixer"]: r for r in results["runs"]}
    assert set(runs) == {"softmax", "softmax[arch=gpt2]"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["softmax[arch=gpt2]"]["arch"] == architecture("gpt2")
    assert runs["softmax"]["arch"] == architecture("llama")
    assert results["config"]["variants"]["softmax[arch=gpt2]"]["positions"] == "learned"
    report = (tmp_path / "quick" / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("Architecture (positions/norm/mlp): "))
    assert "`softmax[arch=gpt2]`: learned/layer/gelu" in line and "`softmax`: rope/rms/swiglu" in line


def test_gatelab_compare_passes_arch(monkeypatch):
    from gatelab.commands import compare as command

    parser = argparse.ArgumentParser()
    command._arguments(parser)
    args = parser.parse_args(["--arch", "gpt2,llama", "--mixers", "softmax"])
    seen = {}
    monkeypatch.setattr("gatelab.lab.comparison.compare", lambda *a, **k: seen.update(k) or {"runs": []})
    assert command.cmd_compare(args) == 0
    assert seen["arch"] == "gpt2,llama" and "--arch gpt2,llama" in seen["command_line"]
