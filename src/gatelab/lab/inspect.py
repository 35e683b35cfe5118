"""What ``gatelab inspect`` reads from a run folder, taken as untrusted input: the model folders (inside the
run folder, none linked in from elsewhere), each model's task from its train_summary.json (a file a task
option names there, such as a text corpus, is read only when the user names it), and the models (checked
against their manifests by LM.load). A bad model is reported and the others go on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gatelab.lab.rundir import IntegrityError, read_json

PATH_OPTIONS = {"text": ("corpus",)}  # per task, the options that name a file or folder to read


def find_model_dirs(path: str | Path, pattern: str = "*") -> list[Path]:
    """Model folders under ``path``: itself if it holds config.json + model.safetensors, else those in
    ``path/models/`` (a compare run) or ``path/`` whose names match ``pattern`` (a glob of folder names:
    no separators, no ``..``); a clear error when there are none."""
    path = Path(path)
    if not isinstance(pattern, str) or not pattern or "/" in pattern or "\\" in pattern or ".." in pattern:
        raise ValueError(f"--models must be a glob of folder names inside the run folder, got {pattern!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or model folder")

    def is_model(p: Path) -> bool:
        return (p / "config.json").is_file() and (p / "model.safetensors").is_file()

    if is_model(path):
        return [path]
    for parent in (path / "models", path):
        found = (
            sorted(p for p in parent.glob(pattern) if p.is_dir() and is_model(p)) if parent.is_dir() else []
        )
        if found:
            return found
    raise FileNotFoundError(
        f"{path} holds no saved model matching {pattern!r}: expected config.json and model.safetensors in it, "
        "or model folders in its models/ (as gatelab compare writes)"
    )


def check_inside(model_dir: Path, run: Path) -> None:
    """Refuse a model folder found in ``run`` that is, or leads through, a link to somewhere else."""
    real, root = model_dir.resolve(), Path(run).resolve()
    if real != root and not real.is_relative_to(root):
        raise ValueError(f"{model_dir} links to {real}, outside the run folder {root}: not read")


def _recorded_task(summary_path: Path) -> tuple[str, dict, dict]:
    """(task name, task options, task description) from a train_summary.json; IntegrityError naming the
    file when it is torn or not a summary."""
    summary = read_json(summary_path)
    summary = summary if isinstance(summary, dict) else {}
    task, options = summary.get("task"), summary.get("task_options") or {}
    if not isinstance(task, dict) or not isinstance(task.get("name"), str) or not isinstance(options, dict):
        raise IntegrityError(f"{str(summary_path)!r} is not a train summary (no task name and options)")
    return task["name"], options, task


def task_of(
    model_dir: Path,
    override: str | None,
    cache: dict | None = None,
    *,
    corpus: str | None = None,
    say: Callable[[str], None] = print,
):
    """The task a model was trained on, from the train_summary.json the trainer wrote next to it
    (``override``: another task, with its default options), built once per distinct task and options
    when ``cache`` is given. ``corpus`` (the user's) replaces the corpus of a text task; a corpus path
    that only the summary names is refused, never read. ``say`` reports what was chosen and why."""
    from gatelab.lab.tasks import make_task

    summary_path = model_dir / "train_summary.json"
    name, options, recorded = override, {}, {}
    if summary_path.is_file():
        try:
            recorded_name, recorded_options, recorded = _recorded_task(summary_path)
        except IntegrityError as error:
            if override is None:
                raise ValueError(f"{error}; give --task to inspect {model_dir} without it") from None
            say(f"note: {error}; using --task {override} with its default options")
            recorded_name, recorded_options = None, {}
        if name is None or name == recorded_name:
            name, options = recorded_name, dict(recorded_options)
    if name is None:
        raise ValueError(f"{model_dir}: no train_summary.json says which task it was trained on; give --task")
    for option in PATH_OPTIONS.get(name, ()):
        if corpus is not None and option == "corpus":
            options[option] = corpus
            say(f"{model_dir.name}: evaluating on the corpus {corpus!r} (given by --corpus)")
        elif options.get(option) is not None:
            raise ValueError(
                f"{summary_path} names the {option} {options[option]!r} for the {name} task; inspect reads no "
                f"path a run folder names unless told to: pass --corpus {options[option]} to read it (or "
                "another corpus)"
            )
    cache = {} if cache is None else cache
    key = (name, json.dumps(options, sort_keys=True, default=str))
    if key not in cache:
        cache[key] = make_task(name, **options)
    task = cache[key]
    trained_on = recorded.get("sha256")
    if corpus is not None and trained_on is not None and task.describe().get("sha256") != trained_on:
        say(f"note: {corpus!r} is not the corpus {model_dir.name} was trained on (its sha256 differs)")
    return task
