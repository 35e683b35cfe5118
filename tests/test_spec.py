"""Run specs and named variants: parsing, validation before any model is built, and the one mapping from a
spec to LMConfig + TrainConfig (checked against the values the commands built before specs existed)."""

import dataclasses
import json

import pytest
import torch

from gatelab.cli import main
from gatelab.lab.kv.study import CacheStudy, base_spec
from gatelab.lab.models.lm import LMConfig
from gatelab.lab.presets import PRESETS
from gatelab.lab.spec import RunSpec, Variant, build, parse_value, parse_variants, split_list
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig


def test_variant_names_and_option_values():
    softmax, headwise, named = parse_variants(
        "softmax, gated_softmax[gate=headwise,input_dependent=false], gated_softmax[gate=elementwise,name=gs_e]"
    )
    assert softmax == Variant("softmax", "softmax", {}) and softmax.slug == "softmax"
    assert headwise.name == "gated_softmax[gate=headwise,input_dependent=false]"
    assert headwise.options == {"gate": "headwise", "input_dependent": False}
    assert headwise.slug == "gated_softmax-gate-headwise-input_dependent-false"
    assert named == Variant("gs_e", "gated_softmax", {"gate": "elementwise"})
    assert [parse_value(t) for t in ("3", "0.5", "true", "False", "none", "headwise", "[1, 2]")] == [
        3, 0.5, True, False, "none", "headwise", [1, 2]
    ]  # fmt: skip
    assert Variant.of("clipped_softmax", {"gamma": -0.03}).name == "clipped_softmax[gamma=-0.03]"
    assert split_list("a, b[x=1,y=2],", "--mixers") == ["a", "b[x=1,y=2]"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("gated_softmax[gate=headwise", "unbalanced brackets"),
        ("gated_softmax[]", "empty brackets"),
        ("gated_softmax[headwise]", "options are NAME=VALUE"),
        ("gated_softmax[gate=a,gate=b]", "gives option 'gate' twice"),
        ("softmax,softmax", "lists a mixer twice"),
        ("gated_softmax[gate=headwise,name=a/b]", "name= takes letters"),
        ("gated_softmax[gate=headwise,name=x],softmax[name=x]", "lists a mixer twice"),
    ],
)
def test_malformed_variants_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text)


def test_bad_variant_options_are_refused_naming_the_variant():
    quick = PRESETS["quick"]
    with pytest.raises(ValueError, match=r"gated_softmax\[gate=bogus\]: gated_softmax options"):
        quick.run_spec("mqar", Variant.parse("gated_softmax[gate=bogus]"))
    with pytest.raises(TypeError, match=r"gated_softmax\[gat=headwise\].*valid options: .*gate"):
        quick.run_spec("mqar", Variant.parse("gated_softmax[gat=headwise]"))
    with pytest.raises(ValueError, match="not in the pattern 'softmax'.*would be ignored"):
        RunSpec(task="mqar", pattern="softmax", mixer_options={"gla": {"expand_k": 1}})
    with pytest.raises(ValueError, match="unknown mechanism 'glaa'"):
        RunSpec(task="mqar", pattern="softmax", mixer_options={"glaa": {}})
    with pytest.raises(ValueError, match="steps must be a positive int"):
        RunSpec(task="mqar", steps=0)


def test_quick_preset_spec_builds_what_compare_built():
    """Hand-written: the LMConfig and TrainConfig that `gatelab compare --preset quick` built before specs."""
    spec = PRESETS["quick"].run_spec("mqar", Variant.parse("softmax"), seed=3, device="cpu")
    task = make_task("mqar", vocab_size=32, seq_len=16, num_kv_pairs=4)
    assert spec.task_options == {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 4}
    assert spec.lm_config(task) == LMConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, pattern="softmax",
                                            mixer_options={}, max_seq_len=16, seed=3)  # fmt: skip
    expected = TrainConfig(steps=20, batch_size=8, lr=3e-3, min_lr_ratio=0.1, warmup=2, eval_every=10,
                           eval_batches=1, eval_batch_size=16, seed=3, device="cpu", out_dir="m", progress=True)  # fmt: skip
    assert spec.train_config("m", progress=True) == expected
    assert (spec.diag_batches, spec.diag_batch_size) == (1, 8)
    # default preset, mqar: its own budget; a variant's options reach the LM as mixer_options
    spec = PRESETS["default"].run_spec("mqar", Variant.parse("gated_softmax[gate=headwise]"), seed=0)
    assert spec.lm_config(task).mixer_options == {"gated_softmax": {"gate": "headwise"}}
    assert spec.pattern == "gated_softmax" and spec.name == "gated_softmax[gate=headwise]"
    assert dataclasses.asdict(spec.train_config(overwrite=True)) == dataclasses.asdict(
        TrainConfig(
            steps=400,
            batch_size=64,
            lr=1e-3,
            min_lr_ratio=1.0,
            warmup=30,
            eval_every=50,
            early_stop=0.99,
            eval_batches=2,
            eval_batch_size=32,
            seed=0,
            overwrite=True,
            progress=False,
        )  # fmt: skip
    )
    assert PRESETS["quick"].replace(steps=1).run_spec("idle", Variant.parse("softmax")).warmup == 0


def test_cache_base_spec_builds_what_cache_built():
    spec, eval_options, budget = base_spec("mqar", CacheStudy(quick=True), seed=1)
    task = make_task("mqar", **spec.task_options)
    spec = spec.replace(max_seq_len=64)
    assert eval_options == {"vocab_size": 72, "seq_len": 64, "num_kv_pairs": 4} and budget["gate_steps"] == 2
    assert spec.lm_config(task) == LMConfig(vocab_size=72, d_model=64, n_layers=2, n_heads=4, pattern="softmax",
                                            max_seq_len=64, seed=1)  # fmt: skip
    assert spec.train_config() == TrainConfig(steps=4, batch_size=64, lr=1e-3, warmup=30, min_lr_ratio=1.0,
                                              eval_every=0, eval_batches=2, progress=False, seed=1)  # fmt: skip


def test_train_arguments_build_what_train_built(monkeypatch, tmp_path):
    seen = {}

    def fake_train(model, task, config):
        seen.update(model=model, task=task, config=config)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr("gatelab.lab.train.train", fake_train)
    argv = ["train", "--pattern", "softmax,gated_softmax", "--mixer-option", "gated_softmax.gate=headwise",
            "--task", "mqar", "--vocab-size", "40", "--seq-len", "16", "--task-option", "num_kv_pairs=2",
            "--d-model", "16", "--heads", "2", "--steps", "50", "--overwrite", "--out", str(tmp_path / "t")]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert seen["model"].config == LMConfig(
        vocab_size=40, d_model=16, n_layers=2, n_heads=2, pattern="softmax,gated_softmax", max_seq_len=16,
        mixer_options={"gated_softmax": {"gate": "headwise"}}, seed=0,
    )  # fmt: skip
    assert seen["config"] == TrainConfig(steps=50, batch_size=32, lr=3e-3, min_lr_ratio=0.1, warmup=5,
                                         weight_decay=0.1, grad_clip=1.0, eval_every=5, eval_batches=8, seed=0,
                                         out_dir=str(tmp_path / "t"), overwrite=True, progress=True)  # fmt: skip
    assert seen["task"].describe()["num_kv_pairs"] == 2


def test_huge_sizes_are_refused_before_the_model_is_built(capsys):
    spec = RunSpec(task="mqar", task_options={"vocab_size": 32, "seq_len": 16}, d_model=2**20, n_heads=4)
    with pytest.raises(ValueError, match="GiB.*lower --batch-size, --d-model"):
        build(spec)  # an LM of this size would need terabytes: refused from the sizes alone
    assert main(["train", "--d-model", "1048576", "--no-progress", "--out", "/nonexistent/never"]) == 2
    assert "GiB" in capsys.readouterr().err
    assert (
        main(["cache", "--quick", "--tasks", "mqar", "--d-model", "1048576", "--out", "/nonexistent/x"]) == 2
    )
    assert "GiB" in capsys.readouterr().err


def test_variants_run_side_by_side_in_one_table(tmp_path):
    threads = torch.get_num_threads()
    mixers = "softmax,gated_softmax[gate=headwise],gated_softmax[gate=elementwise]"
    try:
        argv = ["compare", "--preset", "quick", "--tasks", "mqar", "--steps", "2", "--threads", "1",
                "--mixers", mixers, "--out", str(tmp_path), "--name", "gates"]  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "gates"
    results = json.loads((run_dir / "results.json").read_text())
    names = mixers.split(",")
    assert results["config"]["mixers"] == names and [r["mixer"] for r in results["runs"]] == names
    assert results["config"]["variants"]["gated_softmax[gate=headwise]"] == {
        "key": "gated_softmax", "options": {"gate": "headwise"}}  # fmt: skip
    params = {r["mixer"]: r["params"] for r in results["runs"]}
    assert params[names[1]] < params[names[2]]  # one gate per head vs one per channel
    saved = json.loads((run_dir / results["runs"][1]["model_dir"] / "config.json").read_text())
    assert saved["pattern"] == "gated_softmax" and saved["mixer_options"] == {
        "gated_softmax": {"gate": "headwise"}
    }
    assert set(results["aggregate"]["mqar"]) == set(names)
    report = (run_dir / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert '`gated_softmax[gate=headwise]` = `gated_softmax` with gate="headwise"' in report


def test_compare_is_one_call_from_python(tmp_path):
    import gatelab.lab

    threads = torch.get_num_threads()
    try:
        results = gatelab.lab.compare(
            "quick", mixers=["softmax", Variant.of("gated_softmax", {"gate": "headwise"}, name="hw")],
            tasks=["mqar"], steps=1, threads=1, out=tmp_path, name="py",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert [r["mixer"] for r in results["runs"]] == ["softmax", "hw"]
    assert results["runs"][1]["model_dir"] == "models/hw__mqar__seed0"
    assert results["config"]["variants"]["hw"] == {"key": "gated_softmax", "options": {"gate": "headwise"}}
    assert '`hw` = `gated_softmax` with gate="headwise"' in (tmp_path / "py" / "report.md").read_text()
