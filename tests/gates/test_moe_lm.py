"""The MoE MLP in the lab's LM (``LMConfig(mlp="moe:<router>")``), the trainer's MoE loss and monitors, and
``gatelab compare --mlp`` with its expert-load columns."""

import hashlib

import pytest
import torch
from helpers import check_lm_decodes_like_the_full_pass

from gatelab.gates.moe import MoEMLP, moe_aux_loss, router_keys
from gatelab.lab.models.lm import LM, LMConfig, SwiGLU

ROUTERS = router_keys()


def small(**changes):
    return LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seed=0, **changes)


def test_the_default_lm_is_bit_identical_to_the_one_before_moe():
    """Fingerprints of this LM built by the code before the MLP slot existed (main at 7edba91)."""
    model = LM(small())
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == "4279ce4d870818a18aab89d814ec2e9fcd6e5258f2cbc3664cfcf9e9aff90b1e"
    with torch.no_grad():
        logits, _ = model(torch.arange(24).reshape(2, 12) % 50)
    rounded = torch.round(logits.double() * 1e4).numpy().tobytes()  # robust to the thread count's sums
    assert (
        hashlib.sha256(rounded).hexdigest()
        == "24847b9ad3bc581d304d2e4aebe1cdfe952b961c892924e5d7095b7ecfeca44a"
    )
    explicit = LM(small(mlp="swiglu"))
    assert all(isinstance(b.mlp, SwiGLU) for b in explicit.blocks)
    for (name, a), (_, b) in zip(model.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_lm_decodes_token_by_token_to_the_full_pass(router):
    model = LM(small(mlp=f"moe:{router}")).eval()
    assert all(isinstance(b.mlp, MoEMLP) and b.mlp.router_key == router for b in model.blocks)
    check_lm_decodes_like_the_full_pass(model, torch.randint(0, 50, (2, 9)), 4, f"moe:{router}")


def test_moe_lm_options_reach_the_mlp_and_router_and_save_load(tmp_path):
    config = small(
        mlp="moe:dense_to_sparse", mlp_options={"n_experts": 3, "expert_hidden": 16, "tau_end": 0.5}
    )
    model = LM(config)
    mlp = model.blocks[0].mlp
    assert mlp.n_experts == 3 and mlp.gate_up.shape == (3, 32, 32) and mlp.router.config.tau_end == 0.5
    assert LM(small(mlp="moe:topk")).blocks[0].mlp.expert_hidden == 48  # the dense hidden (88) / 2, to 8
    model.train()
    model(torch.randint(0, 50, (2, 8)))  # one training forward advances the temperature schedule
    model.save(tmp_path)
    loaded = LM.load(tmp_path)
    assert loaded.config.mlp == "moe:dense_to_sparse" and loaded.config.mlp_options == config.mlp_options
    assert int(loaded.blocks[0].mlp.router.steps) == 1
    idx = torch.randint(0, 50, (2, 8))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_moe_lm_config_errors():
    with pytest.raises(
        ValueError, match=r"mlp must be 'swiglu', 'gelu' or 'moe:<router>'.*aw_moe, comet.*got 'moe:nope'"
    ):
        small(mlp="moe:nope")
    with pytest.raises(ValueError, match="got 'relu'"):  # gelu is a dense MLP (tests/models/test_lm_arch.py)
        small(mlp="relu")
    with pytest.raises(ValueError, match="apply to an MoE MLP; mlp is 'swiglu'"):
        small(mlp_options={"n_experts": 8})
    with pytest.raises(ValueError, match=r"topk: k must be in \[1, n_experts=2\]"):
        small(mlp="moe:topk", mlp_options={"n_experts": 2, "k": 3})
    with pytest.raises(
        TypeError, match="mlp_options of moe:comet: .*'gama'; valid options: .*entropy_weight, gamma"
    ):
        small(mlp="moe:comet", mlp_options={"gama": 1.0})
    with pytest.raises(ValueError, match="MoE MLP: expert_hidden must be a positive int, got 0"):
        small(mlp="moe:topk", mlp_options={"expert_hidden": 0})
    with pytest.raises(ValueError, match="path must be one of 'sparse', 'dense', got 'gather'"):
        small(mlp="moe:topk", mlp_options={"path": "gather"})
    with pytest.raises(ValueError, match=r"'comet' is a gate, not a sequence mixer .*mlp='moe:comet'"):
        small(pattern="comet")


def test_compare_refuses_a_router_as_a_mixer_and_points_to_mlp():
    from gatelab.lab.comparison import select_mixers
    from gatelab.lab.presets import PRESETS

    with pytest.raises(
        ValueError, match="'topk' is a gate, not a mixer; an MoE router runs as --mlp moe:topk"
    ):
        select_mixers("softmax,topk", PRESETS["quick"])


def test_the_trainer_adds_the_moe_loss_and_logs_expert_load():
    from gatelab.lab.tasks import make_task
    from gatelab.lab.train import TrainConfig, train
    from gatelab.lab.train.groups import default_terms

    task = make_task("mqar", seq_len=16, num_kv_pairs=2, vocab_size=32)
    model = LM(
        LMConfig(vocab_size=task.vocab_size, d_model=32, n_heads=4, max_seq_len=16, mlp="moe:comet", seed=0)
    )
    losses, monitors = default_terms(model)
    assert set(losses) == {"moe_aux"} and set(monitors) == {"expert_load", "active_experts"}
    assert default_terms(LM(small())) == ({}, {})
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        moe_aux_loss(model)
    config = TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1, warmup=1, log_every=1)
    result = train(model, task, config)
    rows = [r for r in result.history if r.get("split") == "train"]
    assert rows and all(
        r["moe_aux"] > 0 and r["expert_load"] >= 1 and 0 < r["active_experts"] <= 1 for r in rows
    )


def test_moe_aux_loss_is_differentiable_to_the_routers():
    model = LM(small(mlp="moe:topk"))
    model(torch.randint(0, 50, (2, 8)))
    moe_aux_loss(model).backward()
    assert model.blocks[0].mlp.router.proj.weight.grad.abs().sum() > 0


# --- gatelab compare ------------------------------------------------------------------------------------


def test_variants_carry_the_mlp_choice_to_the_run():
    from gatelab.lab.presets import PRESETS
    from gatelab.lab.spec import Variant, parse_variants

    variant = Variant.parse("softmax[mlp=moe:comet,mlp.n_experts=2,mlp.k=1]")
    assert (variant.mlp, variant.mlp_options) == ("moe:comet", {"n_experts": 2, "k": 1})
    assert variant.name == "softmax[mlp=moe:comet,mlp.n_experts=2,mlp.k=1]"
    spec = PRESETS["quick"].run_spec("mqar", variant)
    assert (spec.mlp, spec.mlp_options) == ("moe:comet", {"n_experts": 2, "k": 1})
    assert (
        spec.lm_config(__import__("gatelab.lab.spec", fromlist=["make_task"]).make_task(spec)).mlp
        == "moe:comet"
    )
    crossed = [
        v.with_mlp(m)
        for v in parse_variants("softmax,gated_softmax[name=gs]")
        for m in ("swiglu", "moe:topk")
    ]
    assert [v.name for v in crossed] == ["softmax", "softmax[mlp=moe:topk]", "gs", "gs+moe:topk"]
    with pytest.raises(ValueError, match="already chooses its MLP"):
        variant.with_mlp("moe:topk")
    with pytest.raises(
        ValueError, match=r"softmax\[mlp=moe:bad\]: mlp must be 'swiglu', 'gelu' or 'moe:<router>'"
    ):
        PRESETS["quick"].run_spec("mqar", Variant.parse("softmax[mlp=moe:bad]"))


def test_report_shows_the_moe_columns_only_where_a_run_has_an_moe():
    from gatelab.lab.report import aggregate, table_rows

    def run(mixer, moe):
        return {"mixer": mixer, "task": "text", "seed": 0, "status": "ok", "final": {"loss": 1.0}, "moe": moe}

    stats = {"load_max_over_mean": 1.5, "active_fraction": 0.5, "aux_loss": 0.01}
    results = {"config": {"mixers": ["a", "b"]}, "runs": [run("a", None), run("b", stats)]}
    results["aggregate"] = aggregate(results["runs"])
    header, rows = table_rows(results, "text")
    assert "expert load" in header and "active experts" in header and "MoE aux" in header
    cells = dict(zip(header, rows[1]))
    assert (cells["expert load"], cells["active experts"], cells["MoE aux"]) == ("1.50", "0.50", "0.0100")
    assert dict(zip(header, rows[0]))["expert load"] == "-"
    results["runs"] = [run("a", None)]
    results["config"]["mixers"] = ["a"]
    results["aggregate"] = aggregate(results["runs"])
    assert "expert load" not in table_rows(results, "text")[0]


def test_compare_runs_every_mixer_with_each_mlp_and_reports_moe_stats(tmp_path):
    import io

    from rich.console import Console

    from gatelab.lab.comparison import compare

    threads, log = torch.get_num_threads(), io.StringIO()
    try:
        results = compare("quick", mixers="softmax", mlp="swiglu,moe:topk", tasks=["mqar"], steps=2, seeds=1,
                          device="cpu", out=tmp_path, threads=1, console=Console(file=log, width=300))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    runs = {r["mixer"]: r for r in results["runs"]}
    assert set(runs) == {"softmax", "softmax[mlp=moe:topk]"} and all(
        r["status"] == "ok" for r in runs.values()
    )
    assert runs["softmax"]["moe"] is None
    moe = runs["softmax[mlp=moe:topk]"]["moe"]
    assert (
        moe["active_fraction"] == pytest.approx(0.5)
        and moe["load_max_over_mean"] >= 1
        and moe["aux_loss"] > 0
    )
    assert results["config"]["variants"]["softmax[mlp=moe:topk]"]["mlp"] == "moe:topk"
    assert "expert load" in (tmp_path / "quick" / "report.md").read_text()
    # the variant's options are printed, not eaten as rich markup (progress lines and the table)
    assert log.getvalue().count("softmax[mlp=moe:topk]") >= 2


def test_gatelab_train_takes_the_mlp_and_its_options():
    import argparse

    from gatelab.commands.train import _add_arguments, run_spec

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(["--mlp", "moe:comet", "--mlp-option", "n_experts=8", "--mlp-option", "k=3"])
    spec = run_spec(args)
    assert (spec.mlp, spec.mlp_options) == ("moe:comet", {"n_experts": 8, "k": 3})
    with pytest.raises(ValueError, match=r"comet: k must be in \[1, n_experts=2\]"):
        run_spec(
            parser.parse_args(["--mlp", "moe:comet", "--mlp-option", "n_experts=2", "--mlp-option", "k=3"])
        )
