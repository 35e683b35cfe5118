"""The trainer: schedule, weight-decay groups, exact resume, DDP (2 gloo processes) == one process,
checkpoints, errors, and ``gatelab train``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import MQAR_TINY, tiny_lm, train_config
from safetensors.torch import load_file

from gatelab.cli import main
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.rundir import RunDirBusy
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, lr_at, param_groups, train
from gatelab.testing import assert_close

TASK = MQAR_TINY
tiny, config = tiny_lm, train_config


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
    assert files == {
        "model.safetensors",
        "config.json",
        "trainer.safetensors",
        "trainer.json",
        "manifest.json",
    }


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


# Run folders: one run per folder, the same run on resume ------------------------------------------------


def test_an_earlier_run_is_refused_unless_resume_or_overwrite(tmp_path):
    task = make_task("mqar", **TASK)
    first = train(tiny(), task, config(tmp_path, steps=4))
    with pytest.raises(FileExistsError, match="--overwrite.*--resume"):
        train(tiny(), task, config(tmp_path, steps=4))
    assert json.loads((tmp_path / "train_summary.json").read_text())["final"] == first.final  # untouched
    # overwrite replaces the earlier run whole: an interrupted new run leaves no old final model beside it
    train(tiny(seed=1), task, config(tmp_path, steps=4, stop_after=2, overwrite=True))
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "train_summary.json").exists()
    assert (
        max(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    )
    with pytest.raises(ValueError, match="choose one"):
        config(tmp_path, resume=True, overwrite=True)


def test_cli_train_refuses_an_existing_run_folder(tmp_path, capsys):
    assert main(["train", *CLI_ARGS, "--out", str(tmp_path / "run")]) == 0
    assert main(["train", *CLI_ARGS, "--out", str(tmp_path / "run")]) == 2
    assert "already holds" in capsys.readouterr().err


def test_resume_of_another_run_is_refused_naming_each_field(tmp_path):
    task = make_task("mqar", **TASK)
    train(tiny(), task, config(tmp_path, steps=8, stop_after=4))
    changes = {"lr": 1e-2, "steps": 50, "batch_size": 4, "seed": 1}
    with pytest.raises(ValueError, match="another run") as error:
        train(tiny(), task, config(tmp_path, resume=True, **{"steps": 8, **changes}))
    for name in changes:
        assert f"train.{name}:" in str(error.value)
    with pytest.raises(ValueError, match=r"task\.seq_len: 16 in the checkpoint, 12 now"):
        train(tiny(), make_task("mqar", **{**TASK, "seq_len": 12}), config(tmp_path, steps=8, resume=True))
    other = LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, pattern="gla"))
    with pytest.raises(ValueError, match=r"model\.pattern: 'softmax' in the checkpoint, 'gla' now"):
        train(other, task, config(tmp_path, steps=8, resume=True))
    with pytest.raises(ValueError, match=r"task\.name: 'mqar'"):
        train(
            tiny(),
            make_task("idle", vocab_size=40, seq_len=16, n_pairs=1, n_queries=1),
            config(tmp_path, steps=8, resume=True),
        )
    # where and how far it runs may change: stop, checkpoint cadence, progress, the model's init seed
    rest = train(tiny(seed=4), task, config(tmp_path, steps=8, resume=True, stop_after=6, checkpoint_every=1))
    assert rest.steps == 6
    summary = train(tiny(), task, config(tmp_path, steps=8, resume=True))
    assert summary.steps == 8
    assert json.loads((tmp_path / "train_summary.json").read_text())["resumed_from_step"] == 6


def test_the_run_folder_is_locked_for_the_whole_run(tmp_path):
    """A second process training into the same folder is refused at once, naming the holder."""
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(tmp_path / '.gatelab.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match="pid 4242"):
            train(tiny(), make_task("mqar", **TASK), config(tmp_path))
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train(tiny(), make_task("mqar", **TASK), config(tmp_path))  # released: the folder is free again


def test_bad_numbers_and_devices_are_refused_clearly(tmp_path):
    for name, value in (("lr", float("inf")), ("weight_decay", float("nan")), ("grad_clip", float("nan")),
                        ("min_lr_ratio", float("nan")), ("lr", "1e-3")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N' or 'mps', got 'bogus'"):
        TrainConfig(device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            TrainConfig(device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            TrainConfig(device=f"cuda:{torch.cuda.device_count()}")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out_dir: cannot create the folder"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "file" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            train(tiny(), make_task("mqar", **TASK), config(tmp_path / "ro"))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_an_unwritable_out_folder_is_refused_even_as_root(tmp_path, monkeypatch):
    """CI runs as root, for whom chmod does not make a folder read-only: the refusal is checked through
    the permission test itself (what a read-only mount or another user's folder answers)."""
    import gatelab.lab.rundir as rundir

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "ro"))


def test_cli_device_and_numbers_errors(tmp_path, capsys):
    for flags, message in ((["--device", "bogus"], "device must be"), (["--lr", "inf"], "lr must be a finite"),
                           (["--grad-clip", "nan"], "grad_clip must be a finite")):  # fmt: skip
        assert main(["train", *CLI_ARGS, *flags, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_progress_bar_is_rich_on_stderr(tmp_path, capsys, monkeypatch):
    for name in ("tqdm", "tqdm.auto"):  # not a declared dependency: the bar must not need it
        monkeypatch.setitem(sys.modules, name, None)
    train(tiny(), make_task("mqar", **TASK), config(steps=3, eval_every=0, progress=True))
    err = capsys.readouterr().err
    assert "train mqar" in err and "3/3" in err and "loss" in err


# Parameter groups and extra loss terms ------------------------------------------------------------------


def test_groups_have_their_own_learning_rates_and_frozen_parameters_stay(tmp_path):
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = model.blocks[0].mlp.down.weight
    frozen.requires_grad_(False)
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    rest = [p for n, p in model.named_parameters() if ".mlp." not in n]
    groups = [{"params": mlp, "lr": 0.0}, {"params": rest, "lr": 1e-2, "weight_decay": 0.0}]
    result = train(model, make_task("mqar", **TASK), config(steps=4), groups=groups)
    after = dict(model.named_parameters())
    assert torch.equal(after["blocks.0.mlp.down.weight"], before["blocks.0.mlp.down.weight"])
    assert all(torch.equal(after[n], before[n]) for n in before if ".mlp." in n)  # lr 0
    assert not torch.equal(after["embed.weight"], before["embed.weight"])
    assert [r["lr"] for r in result.history if r["split"] == "train"][:2] == [lr_at(0, config(steps=4)),
                                                                             lr_at(1, config(steps=4))]  # fmt: skip


def test_a_group_lr_follows_the_schedule_scaled():
    c = TrainConfig(steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    assert [lr_at(s, c, peak=0.5) for s in range(10)] == pytest.approx([lr_at(s, c) / 2 for s in range(10)])
    assert lr_at(3, c, peak=c.lr) == lr_at(3, c)  # the default groups' rates are exactly the schedule's


def test_bad_groups_and_terms_are_refused():
    model, task = tiny(), make_task("mqar", **TASK)
    stranger = torch.nn.Parameter(torch.zeros(2))
    cases = [
        ({"groups": [{"params": [stranger]}]}, ValueError, "not a parameter of the model"),
        (
            {"groups": [{"params": [model.embed.weight]}, {"params": [model.embed.weight]}]},
            ValueError,
            "repeats",
        ),
        ({"groups": [{"params": list(model.parameters()), "momentum": 0.9}]}, ValueError, "takes the keys"),
        ({"groups": [{"params": list(model.parameters()), "lr": float("nan")}]}, ValueError, "finite number"),
        ({"extra_losses": {"loss": lambda m: 0.0}}, ValueError, "taken by the train rows"),
        ({"extra_losses": {"l2": lambda m: m.embed.weight}}, ValueError, "must be a scalar"),
        ({"extra_losses": {"l2": 1.0}}, TypeError, "callables"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            train(model, task, config(steps=1), **kwargs)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, task, config(steps=1), groups=[{"params": list(model.parameters())}])


def test_extra_losses_change_the_objective_and_are_logged_by_name():
    task = make_task("mqar", **TASK)
    plain, penalised = tiny(), tiny()
    l2 = lambda m: 0.1 * sum((p**2).sum() for p in m.parameters())
    a = train(plain, task, config(steps=3))
    b = train(
        penalised,
        task,
        config(steps=3),
        extra_losses={"l2": l2},
        monitors={"norm": lambda m: float(m.embed.weight.detach().norm())},
    )
    rows = [r for r in b.history if r["split"] == "train"]
    assert all(set(r) >= {"l2", "norm"} for r in rows) and rows[0]["l2"] > 0
    assert [r["loss"] for r in a.history][0] == [r["loss"] for r in b.history][0]  # the same first batch
    assert float(penalised.embed.weight.detach().norm()) < float(plain.embed.weight.detach().norm())


def test_a_gated_model_brings_its_eviction_loss_and_kept_fraction():
    model = LM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, seed=0,
                        attention_gate={"target_keep": 0.5}))  # fmt: skip
    result = train(model, make_task("mqar", **TASK), config(steps=2))
    rows = [r for r in result.history if r["split"] == "train"]
    assert all(r["eviction"] >= 0 and 0 <= r["kept"] <= 1 for r in rows)
    assert "eviction" not in train(tiny(), make_task("mqar", **TASK), config(steps=1)).history[0]


def test_resume_with_groups_continues_exactly(tmp_path):
    task = make_task("mqar", **TASK)

    def groups(model):
        mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
        return [
            {"params": mlp, "lr": 1e-3},
            {"params": [p for p in model.parameters() if all(p is not q for q in mlp)]},
        ]

    full_model = tiny()
    full = train(full_model, task, config(tmp_path / "full", steps=6), groups=groups(full_model))
    cut = tiny()
    train(cut, task, config(tmp_path / "cut", steps=6, stop_after=3), groups=groups(cut))
    again = tiny(seed=7)
    rest = train(again, task, config(tmp_path / "cut", steps=6, resume=True), groups=groups(again))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(rest.history) == strip(full.history)
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), again.parameters()))


def test_kv_finetuning_goes_through_the_trainer_and_leaves_the_global_rng():
    from gatelab.lab.kv.evaluate import finetune_gates, finetune_lm

    model, task = tiny(), make_task("mqar", **TASK)
    state = torch.get_rng_state()
    tuned, history = finetune_gates(model, task, target_keep=0.5, steps=3, batch_size=4, lr=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert [set(r) for r in history] == [{"step", "ce", "kept"}] * 3 and history[-1]["kept"] is not None
    base = dict(model.named_parameters())
    for name, p in tuned.named_parameters():  # lr 0 freezes the LM: only the gates moved
        if ".cache_policy." not in name:
            assert torch.equal(p, base[name]), name
    control, rows = finetune_lm(model, task, steps=3, batch_size=4)
    assert [r["kept"] for r in rows] == [None] * 3 and not torch.equal(
        control.embed.weight, model.embed.weight
    )
    assert finetune_lm(model, task, steps=0)[1] == []
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        finetune_lm(model, task, steps=1, lr=0.0)
