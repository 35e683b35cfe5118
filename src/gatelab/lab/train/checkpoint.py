"""The trainer's files in a run folder: the checkpoint (model, optimizer and RNG states, the run's spec) as
safetensors + JSON, never a pickle, checked against its manifest before anything is read; metrics.jsonl
(a torn last line tolerated); and the refusal to replace an earlier run."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from gatelab.lab.rundir import (
    MANIFEST,
    IntegrityError,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    read_safetensors,
    refuse_existing,
    verify_manifest,
    write_manifest,
)

from .config import RESUMABLE, spec_differences

CHECKPOINT = "checkpoint"  # folder in out_dir: model.safetensors, config.json, trainer.*, manifest.json
TRAINER_TENSORS, TRAINER_STATE = "trainer.safetensors", "trainer.json"
PICKLED = "trainer.pt"  # what gatelab wrote before: a pickle, which is never loaded
FORMAT = 2
# What a finished or interrupted run leaves in out_dir (the lock file is not a result)
RUN_FILES = (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.tmp", "model.safetensors", "config.json",
             MANIFEST, "metrics.jsonl", "train_summary.json")  # fmt: skip


def _rng_state(generator: torch.Generator) -> tuple[dict, dict]:
    tensors = {"rng/data": generator.get_state(), "rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict, values: dict, generator: torch.Generator) -> None:
    generator.set_state(tensors["rng/data"])
    torch.set_rng_state(tensors["rng/torch"])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    cuda = [tensors[k] for k in cuda]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_state(state: dict) -> tuple[dict, dict]:
    """An optimizer's state_dict split into tensors (safetensors keys optimizer/<param index>/<name>) and
    JSON values (its param_groups and any non-tensor state)."""
    tensors, values = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _read_optimizer(tensors: dict, saved: dict) -> dict:
    """The optimizer state_dict that :func:`_optimizer_state` split."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "optimizer":
            index, _, name = rest.partition("/")
            state.setdefault(int(index), {})[name] = value
    for index, entry in saved["values"].items():
        state.setdefault(int(index), {}).update(entry)
    # JSON turned tuples (AdamW's betas) into lists
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in saved["param_groups"]]  # fmt: skip
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out_dir: Path,
    model,
    optimizer,
    step: int,
    generator: torch.Generator,
    spec: dict | None = None,
    *,
    optimizer_state: dict | None = None,
) -> None:
    """Write the checkpoint folder next to the old one, manifest last, then swap it in by renames: a crash
    at any point leaves either the old or the new checkpoint whole. ``spec`` (see run_spec) is recorded
    so that a resume can refuse another run's checkpoint. ``optimizer_state``: the state_dict to write
    instead of ``optimizer.state_dict()`` (under FSDP the full one, gathered; ``optimizer`` then None)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    final, tmp, old = out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.tmp", out_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    optimizer_tensors, optimizer_values = _optimizer_state(optimizer_state)
    rng_tensors, rng_values = _rng_state(generator)
    atomic_write_bytes(tmp / TRAINER_TENSORS, save({**optimizer_tensors, **rng_tensors}))
    state = {"format": FORMAT, "step": step, "spec": spec, "optimizer": optimizer_values, "rng": rng_values}
    atomic_write_json(tmp / TRAINER_STATE, state)
    write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    out_dir: Path,
    model,
    optimizer,
    generator: torch.Generator,
    spec: dict | None = None,
    *,
    restore: Callable[[dict, dict], None] | None = None,
) -> int:
    """Restore model, optimizer and RNG states; returns the number of steps already done.

    ``restore(model_tensors, optimizer_state_dict)`` loads the two full states instead of
    ``model.load_tensors`` and ``optimizer.load_state_dict`` (under FSDP: into this rank's shards).

    Every file is checked against the checkpoint's manifest first (IntegrityError naming the one that
    differs). With ``spec``, a checkpoint whose recorded spec differs in anything but the RESUMABLE fields
    is refused, naming each field. A pickled trainer.pt (older gatelab) is refused, never unpickled."""
    out_dir = Path(out_dir)
    folder = out_dir / CHECKPOINT
    if not folder.exists() and (out_dir / f"{CHECKPOINT}.old").exists():
        folder = out_dir / f"{CHECKPOINT}.old"  # a crash between the two renames of save_checkpoint
    if not (folder / TRAINER_STATE).is_file():
        if (folder / PICKLED).is_file():
            raise IntegrityError(
                f"{str(folder / PICKLED)!r} is a checkpoint in the pickle format of older gatelab versions; "
                "unpickling can run any code the file holds, so it is not loaded: resume it with the version "
                "that wrote it, or train again (overwrite=True, --overwrite)"
            )
        raise FileNotFoundError(f"resume=True but no checkpoint in {out_dir}; train once with out_dir first")
    verify_manifest(folder)
    state = read_json(folder / TRAINER_STATE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise IntegrityError(
            f"{str(folder / TRAINER_STATE)!r} is not a gatelab checkpoint of format {FORMAT}"
        )
    if spec is not None:
        differences = spec_differences(state.get("spec") or {}, spec)
        if differences:
            raise ValueError(
                f"the checkpoint in {str(out_dir)!r} is of another run: {'; '.join(differences)}. A resume may "
                f"change only {', '.join(RESUMABLE)}; start a new run in another folder or overwrite this one"
            )
    device = next(model.parameters()).device
    model_tensors = read_safetensors(folder / "model.safetensors", device=str(device))
    tensors = read_safetensors(folder / TRAINER_TENSORS)
    try:
        optimizer_state = _read_optimizer(tensors, state["optimizer"])
        if restore is None:
            model.load_tensors(model_tensors)
            optimizer.load_state_dict(optimizer_state)
        else:
            restore(model_tensors, optimizer_state)
        _set_rng_state(tensors, state["rng"], generator)
        return int(state["step"])
    except (KeyError, TypeError, ValueError) as error:
        raise IntegrityError(f"{str(folder)!r} is not a whole gatelab checkpoint: {error!r}") from None


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """The rows of metrics.jsonl up to ``upto_step``. A torn last line (a write cut short) is dropped with a
    warning; a bad line elsewhere is an IntegrityError naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError:
            if i == last:
                warnings.warn(
                    f"{path}: dropped its last line, cut short by an interrupted write", stacklevel=2
                )
                break
            raise IntegrityError(
                f"{str(path)!r}, line {i + 1}: not a metrics row (torn or edited): {line[:80]!r}"
            ) from None
        rows.append(row)
    return [r for r in rows if r["step"] <= upto_step]


def refuse_earlier_run(out_dir: Path, overwrite: bool) -> None:
    """FileExistsError if ``out_dir`` holds files of an earlier run and ``overwrite`` is False."""
    refuse_existing(out_dir, RUN_FILES, overwrite=overwrite, hint=" (or --resume to continue it)")


def remove_earlier_run(out_dir: Path) -> None:
    """Delete what an earlier run left in ``out_dir`` (only the trainer's own files), so that nothing of it
    mixes with the new run (say a final model beside a new, interrupted run's checkpoint)."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
