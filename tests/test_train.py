"""The trainer: schedule, weight-decay groups, exact resume, DDP (2 gloo processes) == one process,
checkpoints, errors, and ``gatelab train``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gatelab.cli import main
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, lr_at, param_groups, train
from gatelab.testing import assert_close

TASK = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}


def tiny(seed=0) -> LM:
    return LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=seed))


def config(out=None, **overrides) -> TrainConfig:
    options = {
        "steps": 6,
        "batch_size": 8,
        "warmup": 2,
        "eval_every": 3,
        "eval_batches": 1,
        "progress": False,
    }
    return TrainConfig(out_dir=None if out is None else str(out), **{**options, **overrides})


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # decreasing after warmup
    assert lr_at(55, c) == pytest.approx(0.55)  # half-way through the cosine: midpoint of 1 and 0.1
    assert lr_at(100, c) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embed.weight) not in decayed
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            assert id(p) not in decayed, name
    assert id(model.blocks[0].mlp.down.weight) in decayed and no_decay["weight_decay"] == 0.0


def test_training_learns_and_writes_files(tmp_path):
    task = make_task("mqar", **TASK)
    result = train(tiny(), task, config(tmp_path, steps=30, lr=1e-2))
    train_rows = [r for r in result.history if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3
    assert set(result.final) == {"loss", "accuracy"} and result.tokens_per_s > 0
    assert result.peak_memory_kind == "cpu_max_rss_delta"
    assert [r["step"] for r in result.history if r["split"] == "val"] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(result.history)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["task"]["name"] == "mqar" and summary["final"] == result.final
    loaded = LM.load(tmp_path)  # the final model is saved in out_dir
    assert task.evaluate(loaded, n_batches=1, batch_size=8) == pytest.approx(result.final)
    assert not (tmp_path / "checkpoint.tmp").exists()
    # the checkpoint holds no pickle: tensors in safetensors, the rest in JSON, checksums last
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert files == {"model.safetensors", "config.json", "trainer.safetensors", "trainer.json", "manifest.json"}


def test_resume_continues_exactly(tmp_path):
    task = make_task("mqar", **TASK)
    full = train(tiny(), task, config(tmp_path / "full", steps=8))
    first = train(tiny(), task, config(tmp_path / "cut", steps=8, stop_after=4))
    assert first.final == {} and max(r["step"] for r in first.history) == 4
    # a different init: everything must come from the checkpoint
    rest = train(tiny(seed=9), task, config(tmp_path / "cut", steps=8, resume=True))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(rest.history) == strip(full.history)  # the same loss curve, bit for bit
    assert rest.final == full.final
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_between_the_checkpoint_renames(tmp_path):
    task = make_task("mqar", **TASK)
    full = train(tiny(), task, config(tmp_path / "full", steps=6))
    train(tiny(), task, config(tmp_path / "cut", steps=6, stop_after=3))
    # the state save_checkpoint leaves if killed after moving the old checkpoint aside
    (tmp_path / "cut" / "checkpoint").rename(tmp_path / "cut" / "checkpoint.old")
    rest = train(tiny(seed=3), task, config(tmp_path / "cut", steps=6, resume=True))
    assert rest.final == full.final


def test_resume_without_checkpoint_and_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path, resume=True))
    with pytest.raises(ValueError, match="out_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="memory"):  # an absurd size is refused before allocating
        big = LM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
        train(big, make_task("mqar", **TASK), config(batch_size=2**40))


CLI_ARGS = [
    "--task", "mqar", "--vocab-size", "40", "--seq-len", "16", "--task-option", "num_kv_pairs=2",
    "--d-model", "16", "--layers", "2", "--heads", "2", "--steps", "3", "--batch-size", "8",
    "--warmup", "1", "--eval-every", "3", "--eval-batches", "1", "--no-progress",
]  # fmt: skip


def test_cli_train_and_errors(tmp_path, capsys):
    assert main(["train", *CLI_ARGS, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "tokens/s" in out
    assert LM.load(tmp_path / "run").config.pattern == "softmax"
    assert main(["train", *CLI_ARGS, "--pattern", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown mechanism" in capsys.readouterr().err
    assert main(["train", *CLI_ARGS, "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), each on half of the global batch == one process on all of it."""
    assert main(["train", *CLI_ARGS, "--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "gatelab.cli", "train", *CLI_ARGS, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    rows = lambda run: [
        json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    ]
    single, ddp = rows("single"), rows("ddp")
    assert [r["step"] for r in single] == [r["step"] for r in ddp]
    for a, b in zip(single, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    a, b = (
        load_file(tmp_path / "single" / "model.safetensors"),
        load_file(tmp_path / "ddp" / "model.safetensors"),
    )
    for name in a:  # the two reduction orders differ in rounding only: the fp32 row of the tolerance table
        assert_close(name, b[name], a[name], torch.float32)
    assert not torch.equal(
        a["embed.weight"],
        LM(LMConfig(**json.loads((tmp_path / "ddp" / "config.json").read_text()))).embed.weight,
    )
