"""The byte-level text task: default stdlib corpus is deterministic and hashed; custom corpora; errors."""

import pytest
import torch

from gatelab.lab.tasks import make_task
from gatelab.lab.tasks.text import load_corpus


def test_stdlib_corpus_is_deterministic_and_described():
    task = make_task("text", seq_len=32, max_bytes=300_000)
    info = task.describe()
    assert info["corpus"].startswith("python-stdlib:") and 0 < info["bytes"] <= 300_000
    assert info["train_bytes"] > info["val_bytes"] > 0 and len(info["sha256"]) == 64
    load_corpus.cache_clear()  # read the files again: same selection, same hash
    assert make_task("text", seq_len=32, max_bytes=300_000).describe() == info
    assert make_task("text", seq_len=32, max_bytes=200_000).describe()["sha256"] != info["sha256"]


def test_batches_are_next_bytes():
    task = make_task("text", seq_len=16, max_bytes=100_000)
    inputs, targets = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 16) and task.vocab_size == 256
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    data = bytes(task.data["train"].tolist())
    row = bytes(inputs[0].tolist()) + bytes(targets[0, -1:].tolist())
    assert row in data
    again = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)


def test_custom_corpus_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file " * 200)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    folder = make_task("text", seq_len=8, corpus=str(tmp_path)).describe()
    assert folder["files"] == 2 and folder["bytes"] == 13 * 200 + 12 * 200
    single = make_task("text", seq_len=8, corpus=str(tmp_path / "a.txt")).describe()
    assert single["files"] == 1 and single["train_bytes"] + single["val_bytes"] == 2600


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        make_task("text", corpus=str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no readable text"):
        make_task("text", corpus=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="seq_len"):
        make_task("text", seq_len=64, corpus=str(tmp_path / "short.txt"))
