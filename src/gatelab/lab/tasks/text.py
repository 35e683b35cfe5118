"""Byte-level language modelling on a text corpus; by default the running Python's own standard library
``.py`` files (present on every Python install), selected deterministically and hashed.

With ``bos`` (the default) the corpus is a list of documents (its files, or with ``separator`` the pieces
of its text between separators), each preceded by a BOS token (256) in one token stream per split, and
every window starts with BOS, as an LM's training documents do (the attention sink forms there)."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from ._base import Task

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
VAL_BUCKETS = 10  # a file goes to validation when sha256(relative path) % 10 == 0: ~10%, fixed per name
BOS = 256  # the beginning-of-document token: one past the bytes
MIN_SPLIT_DOCUMENTS = 10  # a single file's documents split 90/10 by count from this many on, else by bytes


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _select_files(root: Path, suffix: str | None) -> list[Path]:
    """Files under ``root`` (optionally only ``*suffix``) in sorted order of their relative path,
    pruning SKIP_DIRS and hidden folders as we walk (site-packages can be huge)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        files += [
            Path(folder, n) for n in names if not n.startswith(".") and (suffix is None or n.endswith(suffix))
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_files(corpus: str | None, max_bytes: int) -> tuple[str, bool, list[tuple[bytes, bool]]]:
    """(source, whether the corpus is a single file, [(file bytes, goes to validation)]).

    Files are taken in sorted order of their relative path while they fit under ``max_bytes`` (a file
    that does not fit is skipped; a first file larger than the cap is truncated); files with a NUL byte
    (binary) are skipped. Each file goes wholly to train or val by a hash of its relative path.
    """
    if corpus is None:
        root, files = stdlib_dir(), _select_files(stdlib_dir(), ".py")
        source = f"python-stdlib:{root}"
    else:
        root = Path(corpus).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"text corpus {corpus!r} not found: give a text file or a folder of text files"
            )
        files = [root] if root.is_file() else _select_files(root, None)
        source = str(root.resolve())
    read, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total > 0 and total + size > max_bytes:
            continue  # does not fit under the cap: skip it, smaller files later in the order may
        data = path.read_bytes()[: max_bytes - total]
        if not data or b"\0" in data:
            continue
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        bucket = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "big") % VAL_BUCKETS
        read.append((data, bucket == 0))
        total += len(data)
    if total == 0:
        raise ValueError(f"text corpus {source!r} holds no readable text (no non-empty, non-binary files)")
    return source, root.is_file(), read


def _too_small(train: int, val: int) -> bool:
    """Whether a split leaves validation under 2% or training under half of the whole."""
    total = train + val
    return val < total // 50 or train < total // 2


def _byte_corpus(corpus: str | None, max_bytes: int) -> dict:
    """The corpus without BOS: files joined by a newline, split by file or (a single file, or a corpus
    whose val part would be too small) 90/10 by bytes; uint8 streams."""
    source, _, read = _read_files(corpus, max_bytes)
    train = [data for data, is_val in read if not is_val]
    val = [data for data, is_val in read if is_val]
    train_bytes, val_bytes = b"\n".join(train), b"\n".join(val)
    if _too_small(len(train_bytes), len(val_bytes)):
        everything = b"\n".join(train + val)
        cut = len(everything) * 9 // 10
        train_bytes, val_bytes = everything[:cut], everything[cut:]
    digest = hashlib.sha256()
    digest.update(train_bytes)
    digest.update(b"\0")
    digest.update(val_bytes)
    meta = {
        "corpus": source,
        "files": len(read),
        "bytes": sum(len(data) for data, _ in read),
        "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes),
        "sha256": digest.hexdigest(),
    }
    as_tensor = lambda b: (
        torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)
    )
    return {"train": as_tensor(train_bytes), "val": as_tensor(val_bytes), "meta": meta}


def _stream(documents: list[bytes]) -> torch.Tensor:
    """(N,) int16: every document preceded by BOS, N = sum(len(d) + 1)."""
    lengths = torch.tensor([len(d) + 1 for d in documents], dtype=torch.long)
    stream = torch.empty(int(lengths.sum()), dtype=torch.int16)
    is_bos = torch.zeros(len(stream), dtype=torch.bool)
    is_bos[lengths.cumsum(0) - lengths] = True
    content = b"".join(documents)
    stream[~is_bos] = (
        torch.frombuffer(bytearray(content), dtype=torch.uint8).to(torch.int16) if content else 0
    )
    stream[is_bos] = BOS
    return stream


def _document_corpus(corpus: str | None, max_bytes: int, separator: str | None) -> dict:
    """The corpus as BOS-prefixed documents: int16 streams, and each stream's BOS positions.

    Documents are the files, or with ``separator`` the non-empty pieces of each file's text between
    separators (a separator that never occurs is an error). A folder's files go to train or val by the
    hash of their path; a single file's documents split 90/10 by count (the last tenth to val) when it
    has MIN_SPLIT_DOCUMENTS or more. When that split is too small (or impossible), the whole stream is
    split 90/10 by tokens, so val may start inside a document ("split": "bytes").
    """
    source, single, read = _read_files(corpus, max_bytes)
    pieces = []  # (documents of one file, goes to validation)
    for data, is_val in read:
        parts = data.split(separator.encode()) if separator is not None else [data]
        pieces.append(([p for p in parts if p], is_val, len(parts) - 1))  # (documents, val, separators)
    if separator is not None and sum(found for _, _, found in pieces) == 0:
        raise ValueError(
            f"text: separator {separator!r} never occurs in the corpus {source!r}, so "
            f"{'the file would be one document' if single else 'each file would be one document'}; give a "
            "separator the text holds, or separator=None to take each file as one document"
        )
    documents = [d for docs, _, _ in pieces for d in docs]
    if single:
        n_val = len(documents) // 10 if len(documents) >= MIN_SPLIT_DOCUMENTS else 0
        cut = len(documents) - n_val
        train, val, split = documents[:cut], documents[cut:], "documents"
    else:
        train = [d for docs, is_val, _ in pieces if not is_val for d in docs]
        val = [d for docs, is_val, _ in pieces if is_val for d in docs]
        split = "files"
    streams = {"train": _stream(train), "val": _stream(val)}
    counts = {"train": len(train), "val": len(val)}
    if not val or _too_small(len(streams["train"]), len(streams["val"])):
        everything = _stream(documents)
        cut = len(everything) * 9 // 10
        streams, split = {"train": everything[:cut], "val": everything[cut:]}, "bytes"
        counts = {name: int((s == BOS).sum()) for name, s in streams.items()}  # documents starting there
    digest = hashlib.sha256()
    for name in ("train", "val"):
        digest.update(streams[name].numpy().astype("<i2").tobytes())
        digest.update(b"\0")
    meta = {
        "corpus": source,
        "files": len(read),
        "bytes": sum(len(data) for data, _ in read),
        "split": split,
        "documents": len(documents),
        **{f"{name}_documents": counts[name] for name in ("train", "val")},
        **{f"{name}_tokens": len(streams[name]) for name in ("train", "val")},
        **{f"{name}_bytes": int((streams[name] != BOS).sum()) for name in ("train", "val")},
        "sha256": digest.hexdigest(),
    }
    starts = {name: (s == BOS).nonzero().flatten() for name, s in streams.items()}
    return {**streams, "bos_positions": starts, "meta": meta}


@lru_cache(maxsize=4)
def load_corpus(corpus: str | None, max_bytes: int, bos: bool = False, separator: str | None = None) -> dict:
    """Read the corpus once per process: {"train": stream, "val": stream, "meta": {...}}.

    Without ``bos``: uint8 byte streams, the files joined by a newline (see :func:`_byte_corpus`). With
    ``bos``: int16 token streams of BOS-prefixed documents and their "bos_positions" (see
    :func:`_document_corpus`).
    """
    if not bos:
        if separator is not None:
            raise ValueError(f"text: separator applies with bos=True only, got separator={separator!r}")
        return _byte_corpus(corpus, max_bytes)
    return _document_corpus(corpus, max_bytes, separator)


class TextTask(Task):
    """Next-byte prediction, every position labelled.

    bos=True: vocab 257 (bytes and BOS = 256); a window is [BOS, s_i .. s_{i+T-2}] with targets
    [s_i .. s_{i+T-1}] from the BOS-prefixed document stream s, for i uniform over the stream's non-BOS
    positions (so a window starts at a document's first byte as often as at any other byte, and never
    repeats BOS). A BOS inside the window marks a document start; a BOS target, the end of a document.
    bos=False: vocab 256, random windows of seq_len + 1 bytes of the newline-joined files.
    """

    name = "text"

    def __init__(
        self,
        seq_len: int = 128,
        corpus: str | None = None,
        max_bytes: int = 4_000_000,
        bos: bool = True,
        separator: str | None = None,
    ):
        super().__init__(seq_len=seq_len, corpus=corpus, max_bytes=max_bytes, bos=bos, separator=separator)
        for name, value in (("seq_len", seq_len), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"text: {name} must be a positive int, got {value!r}")
        if not isinstance(bos, bool):
            raise ValueError(f"text: bos must be a bool, got {bos!r}")
        if separator is not None and (not isinstance(separator, str) or not separator):
            raise ValueError(f"text: separator must be a non-empty str or None, got {separator!r}")
        self.vocab_size, self.seq_len = (BOS + 1 if bos else 256), seq_len
        self.bos_token = BOS if bos else None
        self.data = load_corpus(None if corpus is None else str(corpus), max_bytes, bos, separator)
        for split in ("train", "val"):
            if len(self.data[split]) < seq_len + 2:
                raise ValueError(
                    f"text: the {split} part of the corpus has {len(self.data[split])} "
                    f"{'tokens' if bos else 'bytes'}, fewer than seq_len + 2 ({seq_len + 2}); give a larger "
                    "corpus or a shorter seq_len"
                )

    def describe(self) -> dict:
        return {**super().describe(), **self.data["meta"]}

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        """-> inputs (B, T) long, targets (B, T) long: the next token at every position."""
        self.check_split(split, batch_size)
        data, T = self.data[split], self.seq_len
        if self.bos_token is None:
            starts = torch.randint(0, len(data) - T - 1, (batch_size, 1), generator=generator)
            window = data[starts + torch.arange(T + 1)].long()  # (B, T + 1)
            return window[:, :-1], window[:, 1:]
        # rank j among the non-BOS positions -> position j + (number of BOS before it) = j + #{k: b_k - k <= j}
        bos_at = self.data["bos_positions"][split]  # (n_docs,) sorted
        ranks = bos_at - torch.arange(len(bos_at))
        last = len(data) - T  # the window's last target is s_{i+T-1}: i <= N - T
        n_starts = last + 1 - int(torch.searchsorted(bos_at, last, right=True))
        rank = torch.randint(0, n_starts, (batch_size, 1), generator=generator)
        starts = rank + torch.searchsorted(ranks, rank, right=True)  # (B, 1)
        targets = data[starts + torch.arange(T)].long()  # (B, T)
        inputs = torch.cat([torch.full((batch_size, 1), BOS), targets[:, :-1]], dim=1)
        return inputs, targets
