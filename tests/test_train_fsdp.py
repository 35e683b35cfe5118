"""FSDP2 in the trainer (2 gloo CPU processes under torchrun): the same losses and final parameters as one
process on the whole batch, checkpoints in the one format that resume under fsdp, ddp and one process, and
the refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, train
from gatelab.testing import assert_close

TASK = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}
# grad_clip below the gradient norm of these steps: the clipping (a norm over every rank's shards) acts
OPTIONS = {"steps": 6, "batch_size": 8, "warmup": 2, "eval_every": 3, "eval_batches": 1, "progress": False,
           "grad_clip": 0.05}  # fmt: skip

# One torchrun launch runs several trainings in turn (each launch costs seconds): the process group is made
# once, and train() joins it.
DRIVER = """
import shutil, sys
import torch.distributed as dist
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, train

out, options = sys.argv[1], eval(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
task = make_task("mqar", vocab_size=40, seq_len=16, num_kv_pairs=2)
tiny = lambda seed: LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=seed))
run = lambda name, seed=0, **o: train(tiny(seed), task, TrainConfig(out_dir=f"{out}/{name}", **{**options, **o}))
run("fsdp", parallel="fsdp")
run("fsdp_unclipped", parallel="fsdp", grad_clip=0.0)
run("fsdp_cut", parallel="fsdp", stop_after=3)
if rank == 0:
    shutil.copytree(f"{out}/fsdp_cut", f"{out}/fsdp_then_ddp")
    shutil.copytree(f"{out}/fsdp_cut", f"{out}/fsdp_then_single")
dist.barrier()
run("fsdp_cut", seed=9, parallel="fsdp", resume=True)  # another init: all must come from the checkpoint
run("fsdp_then_ddp", seed=9, parallel="ddp", resume=True)
run("single_then_fsdp", seed=9, parallel="fsdp", resume=True)
gated = LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=0,
                    attention_gate={"target_keep": 0.5}))
train(gated, task, TrainConfig(out_dir=f"{out}/fsdp_gated", parallel="fsdp", **options))
dist.destroy_process_group()
"""


def tiny(seed=0) -> LM:
    return LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=seed))


def rows(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def test_fsdp_matches_one_process_and_its_checkpoints_resume_anywhere(tmp_path):
    task = make_task("mqar", **TASK)
    single = train(tiny(), task, TrainConfig(out_dir=str(tmp_path / "single"), **OPTIONS))
    train(tiny(), task, TrainConfig(out_dir=str(tmp_path / "single_then_fsdp"), stop_after=3, **OPTIONS))
    gated = LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=0,
                        attention_gate={"target_keep": 0.5}))  # fmt: skip
    train(gated, task, TrainConfig(out_dir=str(tmp_path / "single_gated"), **OPTIONS))
    unclipped = {**OPTIONS, "grad_clip": 0.0}
    train(tiny(), task, TrainConfig(out_dir=str(tmp_path / "single_unclipped"), **unclipped))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(tmp_path / "driver.py"), str(tmp_path), repr(OPTIONS)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # a checkpoint written under fsdp resumes in one process too
    train(tiny(seed=9), task, TrainConfig(out_dir=str(tmp_path / "fsdp_then_single"), resume=True, **OPTIONS))

    assert json.loads((tmp_path / "fsdp" / "train_summary.json").read_text())["world_size"] == 2
    reference = rows(tmp_path / "single")
    assert [r["step"] for r in reference] == [r["step"] for r in single.history]
    models = {"single": load_file(tmp_path / "single" / "model.safetensors")}
    for run in ("fsdp", "fsdp_cut", "fsdp_then_ddp", "fsdp_then_single", "single_then_fsdp"):
        got = rows(tmp_path / run)
        assert [r["step"] for r in got] == [r["step"] for r in reference], run
        for a, b in zip(reference, got):  # train losses and eval metrics alike
            for key in a:
                expected = a[key] if isinstance(a[key], str) else pytest.approx(a[key], rel=1e-5, abs=1e-6)
                assert b[key] == expected, (run, a["step"], key)
        models[run] = load_file(tmp_path / run / "model.safetensors")
        assert set(models[run]) == set(models["single"]), run  # the files of one process: full tensors
        for name, value in models[run].items():  # other reduction orders: the fp32 row of the table
            assert_close(f"{run}: {name}", value, models["single"][name], torch.float32)
    # an extra loss of the forward (the attention gates' eviction loss, a mean over equal slices) keeps
    # working; the monitor "kept" is rank 0's slice, as under DDP, so it is not compared
    reference, got = rows(tmp_path / "single_gated"), rows(tmp_path / "fsdp_gated")
    assert "eviction" in reference[0] and [r.keys() for r in got] == [r.keys() for r in reference]
    for a, b in zip(reference, got):
        for key in ("loss", "eviction", "accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), ("gated", a["step"], key)
    # the checkpoint holds the full optimizer state, as one process writes it. AdamW's moments see the scale
    # of the gradients (its steps barely do, and clipping hides it): unclipped, they check the scaling
    for run in ("", "_unclipped"):
        a = load_file(tmp_path / f"single{run}" / "checkpoint" / "trainer.safetensors")
        b = load_file(tmp_path / f"fsdp{run}" / "checkpoint" / "trainer.safetensors")
        assert set(a) == set(b)
        for name in a:
            if name.startswith("optimizer/"):
                assert_close(f"{run} {name}", b[name], a[name], torch.float32)
    # resumed under fsdp, an fsdp run is the uninterrupted fsdp run, bit for bit
    assert rows(tmp_path / "fsdp_cut") == rows(tmp_path / "fsdp")
    for name, value in models["fsdp"].items():
        assert torch.equal(models["fsdp_cut"][name], value), name
    assert not torch.equal(models["fsdp"]["embed.weight"], tiny().embed.weight.detach())


def test_bad_parallel_values_are_refused():
    for value in ("zero", "FSDP", None, 2):
        with pytest.raises(ValueError, match=r"parallel must be one of 'ddp', 'fsdp', got"):
            TrainConfig(parallel=value)
    # one process: fsdp trains the plain model, as ddp does
    task = make_task("mqar", **TASK)
    options = {**OPTIONS, "eval_batches": 0}
    a = train(tiny(), task, TrainConfig(parallel="fsdp", **options))
    b = train(tiny(), task, TrainConfig(parallel="ddp", **options))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


CLI_ARGS = [
    "--task", "mqar", "--vocab-size", "40", "--seq-len", "16", "--task-option", "num_kv_pairs=2",
    "--d-model", "16", "--layers", "2", "--heads", "2", "--steps", "2", "--batch-size", "8",
    "--warmup", "1", "--eval-batches", "0", "--no-progress",
]  # fmt: skip


def test_cli_takes_parallel(tmp_path, capsys):
    from gatelab.cli import main

    assert main(["train", *CLI_ARGS, "--parallel", "fsdp", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["train_config"]["parallel"] == "fsdp"
    with pytest.raises(SystemExit):
        main(["train", *CLI_ARGS, "--parallel", "zero", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'zero'" in capsys.readouterr().err


def test_an_extra_loss_reading_sharded_parameters_is_refused_by_name(tmp_path):
    import torch.distributed as dist

    from gatelab.lab.train.sharding import Sharded, sharded_term

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = tiny()
        Sharded(model, [{"params": list(model.parameters())}], torch.device("cpu"), 1, keep_copy=False)
        with pytest.raises(ValueError, match="extra loss 'weights'.*parallel='ddp'"):
            sharded_term("weights", lambda m: m.embed.weight.square().sum(), model)
        with pytest.raises(ValueError, match="extra loss 'mixed'.*parallel='ddp'"):
            sharded_term("mixed", lambda m: (m.embed.weight * torch.ones(40, 16)).sum(), model)
        assert sharded_term("number", lambda m: 0.5, model) == 0.5
    finally:
        dist.destroy_process_group()
