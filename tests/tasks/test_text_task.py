"""The byte-level text task: default stdlib corpus is deterministic and hashed; custom corpora; documents
preceded by BOS (windows start with it, separators split a file); bos=False as before; errors."""

import hashlib

import pytest
import torch

from gatelab.lab.tasks import make_task
from gatelab.lab.tasks.text import BOS, load_corpus


def test_stdlib_corpus_is_deterministic_and_described():
    task = make_task("text", seq_len=32, max_bytes=300_000)
    info = task.describe()
    assert info["corpus"].startswith("python-stdlib:") and 0 < info["bytes"] <= 300_000
    assert info["train_bytes"] > info["val_bytes"] > 0 and len(info["sha256"]) == 64
    assert info["bos"] is True and info["separator"] is None and info["split"] == "files"
    assert info["train_documents"] + info["val_documents"] == info["documents"] == info["files"]
    assert info["train_tokens"] == info["train_bytes"] + info["train_documents"]
    load_corpus.cache_clear()  # read the files again: same selection, same hash
    assert make_task("text", seq_len=32, max_bytes=300_000).describe() == info
    assert make_task("text", seq_len=32, max_bytes=200_000).describe()["sha256"] != info["sha256"]
    no_bos = make_task("text", seq_len=32, max_bytes=300_000, bos=False).describe()
    assert no_bos["bos"] is False and no_bos["sha256"] != info["sha256"] and "documents" not in no_bos


def test_bos_windows_start_with_bos_and_mark_every_document_start(tmp_path):
    docs = [f"doc{k:02d} " + "abcdefghij"[: 3 + k % 7] for k in range(30)]
    (tmp_path / "c.txt").write_text("<|endoftext|>".join(docs))
    task = make_task("text", seq_len=12, corpus=str(tmp_path / "c.txt"), separator="<|endoftext|>")
    assert task.vocab_size == 257 and task.bos_token == BOS == 256
    inputs, targets = task.get_batch("train", 64, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (64, 12) and inputs.dtype == targets.dtype == torch.long
    assert (inputs[:, 0] == BOS).all() and (inputs[:, 1] != BOS).all()  # BOS never repeated at the start
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # every position labelled with the next token
    stream = task.data["train"].long()
    for row in targets:  # the targets are a window of the stream, whose BOS precede every document
        starts = [i for i in range(len(stream) - 11) if torch.equal(stream[i : i + 12], row)]
        assert starts and stream[starts[0]] != BOS
    text = bytes(t for t in stream.tolist() if t != BOS).decode()
    assert text == "".join(docs[:27])  # documents 90/10 by count: the last 3 go to validation
    assert [bytes(d).decode() for d in _documents(stream)] == docs[:27]
    val = task.data["val"].long()
    assert [bytes(d).decode() for d in _documents(val)] == docs[27:]
    info = task.describe()
    assert (info["split"], info["train_documents"], info["val_documents"]) == ("documents", 27, 3)
    assert info["separator"] == "<|endoftext|>" and info["vocab_size"] == 257


def _documents(stream):
    """The documents of a BOS-prefixed stream (which starts with BOS)."""
    assert stream[0] == BOS
    out = []
    for token in stream.tolist():
        if token == BOS:
            out.append([])
        else:
            out[-1].append(token)
    return out


def test_window_starts_are_uniform_over_the_non_bos_positions(tmp_path):
    """Every start holding a byte is drawn, none holding BOS, about equally often: a window aligned with a
    document start ([BOS, first byte, ...]) comes as often as any other start, not more."""
    chars, docs = [chr(c) for c in range(33, 127)], []  # every byte once: a window tells its start
    while chars:
        docs.append("".join(chars[: 1 + len(docs) % 5]))
        chars = chars[1 + (len(docs) - 1) % 5 :]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    task = make_task("text", seq_len=4, corpus=str(tmp_path / "c.txt"), separator="\n\n")
    stream = task.data["train"].long()
    valid = [i for i in range(len(stream) - 3) if stream[i] != BOS]
    windows = {tuple(stream[i : i + 4].tolist()): i for i in valid}
    assert len(windows) == len(valid) and len(docs) >= 20
    generator, counts = torch.Generator().manual_seed(0), torch.zeros(len(stream))
    for _ in range(40):
        _, targets = task.get_batch("train", 500, generator)
        for row in targets.tolist():
            counts[windows[tuple(row)]] += 1
    drawn = counts[valid]
    assert (counts > 0).sum() == len(valid) == (drawn > 0).sum()  # exactly the valid starts
    expected = 20_000 / len(valid)
    assert drawn.min() > 0.6 * expected and drawn.max() < 1.4 * expected
    aligned = [i for i in valid if i > 0 and stream[i - 1] == BOS]
    assert abs(counts[aligned].mean() - expected) < 0.15 * expected


def test_bos_false_batches_are_the_bytes_as_before():
    task = make_task("text", seq_len=16, max_bytes=100_000, bos=False)
    inputs, targets = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 16) and task.vocab_size == 256 and task.bos_token is None
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    row = bytes(inputs[0].tolist()) + bytes(targets[0, -1:].tolist())
    assert row in bytes(task.data["train"].tolist())
    again = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)
    # the windows of the task before BOS existed: starts drawn as randint(0, N - T - 1) of the byte stream
    data = task.data["train"]
    starts = torch.randint(0, len(data) - 17, (4, 1), generator=torch.Generator().manual_seed(0))
    window = data[starts + torch.arange(17)].long()
    assert torch.equal(inputs, window[:, :-1]) and torch.equal(targets, window[:, 1:])


def test_bos_false_corpus_is_the_newline_joined_files_with_the_old_hash(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 200)
    (tmp_path / "b.txt").write_text("second file " * 200)
    info = make_task("text", seq_len=8, corpus=str(tmp_path), bos=False).describe()
    everything = (tmp_path / "a.txt").read_bytes() + b"\n" + (tmp_path / "b.txt").read_bytes()
    cut = len(everything) * 9 // 10  # two files: too few for a split by file, so 90/10 by bytes
    expected = hashlib.sha256(everything[:cut] + b"\0" + everything[cut:]).hexdigest()
    assert info["sha256"] == expected and info["train_bytes"] == cut


def test_custom_corpus_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file " * 200)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    folder = make_task("text", seq_len=8, corpus=str(tmp_path)).describe()
    assert folder["files"] == 2 and folder["bytes"] == 13 * 200 + 12 * 200
    assert folder["documents"] == 2 and folder["train_tokens"] + folder["val_tokens"] == folder["bytes"] + 2
    single = make_task("text", seq_len=8, corpus=str(tmp_path / "a.txt")).describe()
    assert single["files"] == 1 and single["train_bytes"] + single["val_bytes"] == 2600
    assert single["split"] == "bytes" and single["documents"] == 1  # one document: split by bytes
    old = make_task("text", seq_len=8, corpus=str(tmp_path / "a.txt"), bos=False).describe()
    assert old["train_bytes"] + old["val_bytes"] == 2600


def test_separator_splitting_drops_empty_pieces_and_splits_every_file(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\n\nthree\n\n")
    (tmp_path / "b.txt").write_text("four\n\nfive " * 50)
    task = make_task("text", seq_len=8, corpus=str(tmp_path), separator="\n\n")
    stream = torch.cat([task.data["train"], task.data["val"]]).long()
    documents = {bytes(d).decode() for d in _documents(stream)}
    assert {"one", "two", "three", "four"} <= documents and "" not in documents
    assert task.describe()["documents"] == 3 + 51


def test_options_and_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        make_task("text", corpus=str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no readable text"):
        make_task("text", corpus=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="seq_len"):
        make_task("text", seq_len=64, corpus=str(tmp_path / "short.txt"))
    (tmp_path / "a.txt").write_text("no blank lines here\n" * 100)
    with pytest.raises(ValueError, match="separator '<\\|endoftext\\|>' never occurs.*one document"):
        make_task("text", seq_len=8, corpus=str(tmp_path / "a.txt"), separator="<|endoftext|>")
    for options, message in (
        ({"bos": 1}, "bos must be a bool, got 1"),
        ({"bos": "yes"}, "bos must be a bool"),
        ({"separator": ""}, "separator must be a non-empty str or None, got ''"),
        ({"separator": b"\n\n"}, "separator must be a non-empty str"),
        ({"bos": False, "separator": "\n\n"}, "separator applies with bos=True only"),
    ):
        with pytest.raises(ValueError, match=message):
            make_task("text", seq_len=8, corpus=str(tmp_path / "a.txt"), **options)


def test_other_tasks_have_no_bos_token():
    assert make_task("mqar", vocab_size=32, seq_len=16, num_kv_pairs=4).bos_token is None
    assert make_task("idle", vocab_size=64, seq_len=32, n_pairs=2, n_queries=2).bos_token is None
