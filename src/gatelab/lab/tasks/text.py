"""Byte-level language modelling on a text corpus; by default the running Python's own standard library
``.py`` files (present on every Python install), selected deterministically and hashed."""

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


@lru_cache(maxsize=4)
def load_corpus(corpus: str | None, max_bytes: int) -> dict:
    """Read the corpus once per process: {"train": uint8 tensor, "val": uint8 tensor, "meta": {...}}.

    Files are taken in sorted order of their relative path while they fit under ``max_bytes`` (a file
    that does not fit is skipped; a first file larger than the cap is truncated); files with a NUL byte
    (binary) are skipped. Each file goes wholly to train or val by a hash of its relative path; a single
    file (or a corpus whose val part would be too small) is split 90/10 by bytes instead.
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
    train, val, used, total = [], [], 0, 0
    for path in files:
        size = path.stat().st_size
        if total > 0 and total + size > max_bytes:
            continue  # does not fit under the cap: skip it, smaller files later in the order may
        data = path.read_bytes()[: max_bytes - total]
        if not data or b"\0" in data:
            continue
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        bucket = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "big") % VAL_BUCKETS
        (val if bucket == 0 else train).append(data)
        used, total = used + 1, total + len(data)
    if total == 0:
        raise ValueError(f"text corpus {source!r} holds no readable text (no non-empty, non-binary files)")
    train_bytes, val_bytes = b"\n".join(train), b"\n".join(val)
    if len(val_bytes) < total // 50 or len(train_bytes) < total // 2:
        everything = b"\n".join(train + val)
        cut = len(everything) * 9 // 10
        train_bytes, val_bytes = everything[:cut], everything[cut:]
    digest = hashlib.sha256()
    digest.update(train_bytes)
    digest.update(b"\0")
    digest.update(val_bytes)
    meta = {
        "corpus": source,
        "files": used,
        "bytes": total,
        "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes),
        "sha256": digest.hexdigest(),
    }
    as_tensor = lambda b: (
        torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)
    )
    return {"train": as_tensor(train_bytes), "val": as_tensor(val_bytes), "meta": meta}


class TextTask(Task):
    """Next-byte prediction: vocab 256, every position labelled, random windows of seq_len + 1 bytes."""

    name = "text"

    def __init__(self, seq_len: int = 128, corpus: str | None = None, max_bytes: int = 4_000_000):
        super().__init__(seq_len=seq_len, corpus=corpus, max_bytes=max_bytes)
        for name, value in (("seq_len", seq_len), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"text: {name} must be a positive int, got {value!r}")
        self.vocab_size, self.seq_len = 256, seq_len
        self.data = load_corpus(None if corpus is None else str(corpus), max_bytes)
        for split in ("train", "val"):
            if len(self.data[split]) < seq_len + 2:
                raise ValueError(
                    f"text: the {split} part of the corpus has {len(self.data[split])} bytes, fewer than "
                    f"seq_len + 2 ({seq_len + 2}); give a larger corpus or a shorter seq_len"
                )

    def describe(self) -> dict:
        return {**super().describe(), **self.data["meta"]}

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        """-> inputs (B, T) long bytes, targets (B, T) long: the next byte at every position."""
        self.check_split(split, batch_size)
        data = self.data[split]
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size, 1), generator=generator)
        window = data[starts + torch.arange(self.seq_len + 1)].long()  # (B, T + 1)
        return window[:, :-1], window[:, 1:]
