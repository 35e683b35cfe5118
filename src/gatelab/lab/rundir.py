"""Run folders on disk: atomic writes, one process per folder, no silent overwrite, checksums.

Everything the lab writes into a run folder goes through here, so each rule lives in one place:

- ``atomic_write_text`` / ``atomic_write_bytes``: a reader (or a crash) sees the old file or the new one,
  never half of one (write to a temporary file in the same folder, fsync, ``os.replace``).
- ``locked(run_dir)``: an exclusive, non-blocking ``flock`` on ``run_dir/.gatelab.lock`` for the duration of
  a command; a second process aiming at the same folder is refused at once, naming the holder's pid.
- ``refuse_existing(run_dir, names, overwrite=...)``: a command that would replace earlier results refuses
  unless asked to overwrite (or to resume).
- ``write_manifest`` / ``verify_manifest``: sha256 of a folder's files in ``manifest.json``, written last
  (atomically); ``verify_manifest`` raises :class:`IntegrityError` naming the first file that differs.
- ``read_json`` / ``read_safetensors``: a torn or foreign file gives an :class:`IntegrityError` naming it,
  not a bare decoder error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

LOCK_NAME = ".gatelab.lock"
MANIFEST = "manifest.json"


class IntegrityError(ValueError):
    """A file of a run folder is missing, torn or changed since it was written."""


class RunDirBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def check_writable(folder: str | Path, what: str = "out") -> Path:
    """Create ``folder`` (and parents) or raise a ValueError naming ``what`` and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot create the folder {str(folder)!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: the folder {str(folder)!r} is not writable")
    return folder


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run folder for this process; a second holder gets :class:`RunDirBusy` at once."""
    run_dir = check_writable(run_dir)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(
                f"run folder {str(run_dir)!r} is in use by another gatelab process (pid {holder}); "
                "wait for it or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def refuse_existing(run_dir: str | Path, names: Iterable[str], *, overwrite: bool, hint: str = "") -> None:
    """Raise FileExistsError if any of ``names`` already exists in ``run_dir`` and ``overwrite`` is False."""
    run_dir = Path(run_dir)
    found = [n for n in names if (run_dir / n).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{str(run_dir)!r} already holds {', '.join(found)} from an earlier run; "
            f"pass --overwrite to replace it{hint} or choose another folder"
        )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, names: Iterable[str]) -> None:
    """Record the sha256 and size of each named file of ``folder`` in ``manifest.json`` (written last)."""
    folder = Path(folder)
    files = {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}
    atomic_write_json(folder / MANIFEST, {"format": 1, "files": files})


def verify_manifest(folder: str | Path, *, required: bool = True) -> dict[str, dict]:
    """Check every file listed in ``folder/manifest.json``; returns the listing.

    Raises :class:`IntegrityError` naming the file when the manifest is missing (``required``), unreadable,
    or a listed file is missing or differs from what was written."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise IntegrityError(f"{str(path)!r} is missing: cannot check the files of {str(folder)!r}")
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{str(path)!r} is not a gatelab manifest (torn or edited)") from None
    for name, entry in files.items():
        target = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{str(path)!r} lists {name!r}, which is outside its folder")
        if not target.is_file():
            raise IntegrityError(f"{str(target)!r} is missing (listed in {MANIFEST})")
        if target.stat().st_size != entry.get("bytes") or sha256_file(target) != entry.get("sha256"):
            raise IntegrityError(
                f"{str(target)!r} changed since it was written (sha256 differs from {MANIFEST})"
            )
    return files


def read_json(path: str | Path):
    """The JSON value in ``path``; :class:`IntegrityError` naming the file when it is torn or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise IntegrityError(f"{str(path)!r} is not a text file (torn or not written by gatelab)") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(
            f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}): torn or edited"
        ) from None


def read_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a safetensors file; :class:`IntegrityError` naming the file when it is truncated,
    torn or not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise IntegrityError(
            f"{str(path)!r} cannot be read as safetensors ({e}): truncated or torn"
        ) from None
