"""Crafted run folders: a pickle payload in a checkpoint, torn and flipped files, names that leave their
folder, a train summary naming a foreign corpus. Each is refused (or tolerated, for a torn last metrics
line) with an error that names the file, and nothing in them runs or is read without being asked for."""

import json
import os
import pickle
import shutil

import pytest
import torch

from gatelab.cli import main
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.rundir import IntegrityError, write_manifest
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, train

TASK = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}


def tiny(seed=0) -> LM:
    return LM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, seed=seed))


def config(out, **overrides) -> TrainConfig:
    options = {
        "steps": 4,
        "batch_size": 4,
        "warmup": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "progress": False,
    }
    return TrainConfig(out_dir=str(out), **{**options, **overrides})


class Payload:
    """Unpickling this creates ``marker``: the code execution a crafted checkpoint would get."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def interrupted_run(out):
    """A run stopped after 2 of 4 steps: out/checkpoint holds a resumable checkpoint."""
    train(tiny(), make_task("mqar", **TASK), config(out, stop_after=2))
    return out / "checkpoint"


def flip_byte(path, offset=-9):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_the_payload_is_real(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_dir()  # so its absence below means it was not unpickled


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    folder = interrupted_run(tmp_path / "run")
    marker = tmp_path / "code-ran"
    for name in ("trainer.json", "trainer.safetensors", "manifest.json"):
        (folder / name).unlink()  # what gatelab wrote before: model files and a pickled trainer.pt
    torch.save({"step": 2, "optimizer": Payload(marker)}, folder / "trainer.pt")
    with pytest.raises(IntegrityError, match=r"trainer\.pt.*pickle"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "run", resume=True))
    assert not marker.exists()


def test_a_planted_pickle_beside_a_checkpoint_is_ignored(tmp_path):
    folder = interrupted_run(tmp_path / "run")
    marker = tmp_path / "code-ran"
    (folder / "trainer.pt").write_bytes(pickle.dumps(Payload(marker)))
    result = train(tiny(), make_task("mqar", **TASK), config(tmp_path / "run", resume=True))
    assert result.steps == 4 and not marker.exists()


@pytest.mark.parametrize("name", ["trainer.safetensors", "trainer.json", "model.safetensors", "config.json"])
def test_a_changed_checkpoint_file_is_named(tmp_path, name):
    folder = interrupted_run(tmp_path / "run")
    flip_byte(folder / name)
    with pytest.raises(IntegrityError, match=rf"{name}.*changed"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "run", resume=True))


def test_a_torn_checkpoint_manifest_is_named(tmp_path):
    folder = interrupted_run(tmp_path / "run")
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(IntegrityError, match=r"manifest\.json"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "run", resume=True))


def test_a_consistent_but_crafted_trainer_state_is_refused(tmp_path):
    """Checksums only prove the files are whole: a crafted trainer.json (with a matching manifest) that is
    not a checkpoint gives an IntegrityError, not a KeyError."""
    folder = interrupted_run(tmp_path / "run")
    state = json.loads((folder / "trainer.json").read_text())
    del state["optimizer"]
    (folder / "trainer.json").write_text(json.dumps(state))
    write_manifest(folder, ["model.safetensors", "config.json", "trainer.safetensors", "trainer.json"])
    with pytest.raises(IntegrityError, match="not a whole gatelab checkpoint"):
        train(tiny(), make_task("mqar", **TASK), config(tmp_path / "run", resume=True))


def test_flipped_and_truncated_saved_models_are_named(tmp_path):
    model = tiny()
    model.save(tmp_path / "m")
    LM.load(tmp_path / "m")
    flip_byte(tmp_path / "m" / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model\.safetensors.*changed"):
        LM.load(tmp_path / "m")
    # a folder from before manifests: loads with a warning, but a truncated file is still named
    model.save(tmp_path / "old")
    (tmp_path / "old" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        LM.load(tmp_path / "old")
    data = (tmp_path / "old" / "model.safetensors").read_bytes()
    (tmp_path / "old" / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.warns(UserWarning), pytest.raises(IntegrityError, match=r"model\.safetensors.*truncated"):
        LM.load(tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text('{"vocab_size": 40,')
    with pytest.warns(UserWarning), pytest.raises(IntegrityError, match=r"config\.json.*not valid JSON"):
        LM.load(tmp_path / "old")


@pytest.mark.parametrize("name", ["../../outside.txt", "/etc/hostname"])
def test_a_manifest_naming_files_outside_its_folder_is_refused(tmp_path, name):
    tiny().save(tmp_path / "runs" / "m")
    manifest = json.loads((tmp_path / "runs" / "m" / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (tmp_path / "runs" / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="outside its folder"):
        LM.load(tmp_path / "runs" / "m")


def test_a_torn_last_metrics_line_is_tolerated_a_torn_middle_one_named(tmp_path):
    task = make_task("mqar", **TASK)
    full = train(tiny(), task, config(tmp_path / "full"))
    interrupted_run(tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "split": "tr')  # the write a crash cut short
    with pytest.warns(UserWarning, match="dropped its last line"):
        rest = train(tiny(seed=5), task, config(tmp_path / "run", resume=True))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(rest.history) == strip(full.history)
    shutil.rmtree(tmp_path / "run")
    interrupted_run(tmp_path / "run")
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    with pytest.raises(IntegrityError, match=r"metrics\.jsonl.*line 1"):
        train(tiny(), task, config(tmp_path / "run", resume=True))


def saved_run(root, name="a", **task_overrides):
    """A tiny trained model in root/models/<name>, with the train_summary.json the trainer writes."""
    train(tiny(), make_task("mqar", **TASK), config(root / "models" / name, steps=2))
    return root / "models" / name


def test_inspect_refuses_a_corpus_path_the_run_folder_names(tmp_path, capsys, monkeypatch):
    model_dir = saved_run(tmp_path / "run")
    LM(LMConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, seed=0)).save(model_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for evaluation " * 100)
    summary = json.loads((model_dir / "train_summary.json").read_text())
    summary["task"] = {"name": "text"}
    summary["task_options"] = {"seq_len": 16, "corpus": str(secret)}
    (model_dir / "train_summary.json").write_text(json.dumps(summary))
    read = []
    import gatelab.lab.tasks.text as text

    original = text.load_corpus
    monkeypatch.setattr(
        text, "load_corpus", lambda corpus, *options: read.append(corpus) or original(corpus, *options)
    )
    assert main(["inspect", str(tmp_path / "run"), "--batches", "1", "--batch-size", "2", "--no-quant"]) == 1
    err = capsys.readouterr().err
    assert "train_summary.json names the corpus" in err and "--corpus" in err and read == []
    # named by the user, it is read, and said so
    argv = ["inspect", str(tmp_path / "run"), "--batches", "1", "--batch-size", "2", "--no-quant", "--json"]
    assert main([*argv, "--corpus", str(secret)]) == 0
    assert read == [str(secret)] and "given by --corpus" in capsys.readouterr().err


def test_inspect_refuses_model_folders_outside_the_run_folder(tmp_path, capsys):
    saved_run(tmp_path / "run", "a")
    saved_run(tmp_path / "elsewhere", "b")
    (tmp_path / "run" / "models" / "b").symlink_to(tmp_path / "elsewhere" / "models" / "b")
    argv = ["inspect", str(tmp_path / "run"), "--batches", "1", "--batch-size", "2", "--no-quant", "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert "layers" in results[str(tmp_path / "run" / "models" / "a")]
    assert "outside the run folder" in results[str(tmp_path / "run" / "models" / "b")]["error"]
    for pattern in ("../*", "models/../../*", "/etc"):
        assert main(["inspect", str(tmp_path / "run"), "--models", pattern]) == 2
        assert "--models must be a glob of folder names" in capsys.readouterr().err


def test_inspect_names_a_crafted_task_and_goes_on(tmp_path, capsys):
    saved_run(tmp_path / "run", "a")
    bad = saved_run(tmp_path / "run", "b")
    summary = json.loads((bad / "train_summary.json").read_text())
    summary["task"]["name"] = "../../etc/passwd"
    (bad / "train_summary.json").write_text(json.dumps(summary))
    argv = ["inspect", str(tmp_path / "run"), "--batches", "1", "--batch-size", "2", "--no-quant", "--json"]
    assert main(argv) == 1
    results = json.loads(capsys.readouterr().out)
    assert (
        "unknown task" in results[str(bad)]["error"] and "layers" in results[str(tmp_path / "run/models/a")]
    )


@pytest.mark.parametrize("corpus", ["../../../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa"])
def test_task_of_never_reads_a_corpus_only_the_summary_names(tmp_path, corpus):
    from gatelab.lab.inspect import task_of

    (tmp_path / "train_summary.json").write_text(
        json.dumps({"task": {"name": "text"}, "task_options": {"corpus": corpus, "seq_len": 16}})
    )
    with pytest.raises(ValueError, match="inspect reads no path a run folder names unless told to"):
        task_of(tmp_path, None)
