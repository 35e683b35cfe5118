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
    ``path/models/`` (a compare run) and ``path/shards/*/models/`` (its --workers' shards), or ``path/`` whose names match ``pattern`` (a glob of folder names:
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
    shards = sorted(p / "models" for p in (path / "shards").glob("*")) if (path / "shards").is_dir() else []
    for parents in ([path / "models", *shards], [path]):  # a run (its workers' shards too), or a folder
        found = [
            p for parent in parents if parent.is_dir() for p in sorted(parent.glob(pattern))
            if p.is_dir() and is_model(p)
        ]  # fmt: skip
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
            if name == "text" and "bos" not in options:  # recorded before the text task had BOS: bytes only
                options["bos"] = False
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


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PER_HEAD_COLUMN = 8  # heads up to which the table lists each head's sink share (beyond: the heat map)


def diagnostic_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The per-layer table of a diagnose / diagnose_hf result: (header, rows of cells), shared by the
    terminal table and report.md. A transformers result adds a share column per special token that is not
    the first token, and the two channels of the largest activations with the tokens they sit on; the
    per-head column is left to the heat maps beyond PER_HEAD_COLUMN heads, the gate columns to models
    with gates."""
    first = result.get("first_token")
    special = {k: v for k, v in result.get("special_share_layer", {}).items() if k != first}
    top_dims = result.get("top_dims")
    per_head = max((len(h) for h in result["sink_share"] if h is not None), default=0) <= PER_HEAD_COLUMN
    gates = any(g is not None for g in result["gate_mean"])
    bos = any(b is not None for b in result.get("bos_share_layer") or [])
    header = ["layer", "mixer", f"{first} share" if first else "sink share"]
    header += ["sink per head"] if per_head else []
    header += ["BOS share", "position 1 share"] if bos else []
    header += [f"{name} share" for name in special] + ["attn entropy", "max act", "act max/median"]
    header += ["top dims"] if top_dims else []
    header += ["token kurtosis", "block inf-norm", "block kurtosis"]
    header += ["gate mean", "gate < 0.1"] if gates else []
    rows = []
    for i, key in enumerate(result["layers"]):
        heads = result["sink_share"][i]
        row = [str(i + 1), str(key), _fmt(result["sink_share_layer"][i], ".3f")]
        if per_head:
            row += ["-" if heads is None else " ".join(f"{h:.2f}" for h in heads)]
        if bos:
            row += [
                _fmt(result["bos_share_layer"][i], ".3f"),
                _fmt(result["first_content_share_layer"][i], ".3f"),
            ]
        row += [_fmt(shares[i], ".3f") for shares in special.values()]
        row += [_fmt(result["attn_entropy_layer"][i], ".2f"), _fmt(result["max_activation"][i + 1], ".2f")]
        row += [_fmt(result["massive_ratio"][i + 1], ".0f")]
        if top_dims:
            row += [", ".join(f"{d['dim']} {d['token']}" for d in top_dims[i + 1][:2])]
        row += [_fmt(result["residual_kurtosis"][i + 1], ".1f"), _fmt(result["block_inf_norm"][i], ".2f")]
        row += [_fmt(result["block_kurtosis"][i], ".1f")]
        if gates:
            row += [_fmt(result["gate_mean"][i], ".3f"), _fmt(result["gate_frac_below"][i], ".2f")]
        rows.append(row)
    return header, rows


def summary_lines(result: dict) -> list[str]:
    """One-line summaries under the table: sinks and outliers, then (transformers results) the largest
    activation, special-token shares and the W8A8 figures, saying what each is measured on."""
    s = result["summary"]
    lines = [
        f"sink share {_fmt(s['sink_share'], '.3f')} (uniform {_fmt(s['sink_share_uniform'], '.4f')}), "
        f"max act {_fmt(s['max_activation'], '.2f')}, max inf-norm {_fmt(s['max_inf_norm'], '.2f')}, "
        f"avg kurtosis {_fmt(s['avg_kurtosis'], '.1f')}"
    ]
    if s.get("bos_share") is not None:
        lines.append(
            f"BOS share {s['bos_share']:.3f} (uniform {_fmt(s.get('bos_share_uniform'), '.4f')}), position 1 "
            f"share {_fmt(s.get('first_content_share'), '.3f')} (largest layer's head mean)"
        )
    if s.get("special_share"):
        uniform = result.get("special_share_uniform", {})
        lines.append(
            "special-token share (max over layers of the head mean): "
            + ", ".join(
                f"{k} {_fmt(v, '.3f')} (uniform {_fmt(uniform.get(k), '.4f')})"
                for k, v in s["special_share"].items()
            )
        )
    top = s.get("top_activation")
    if top:
        lines.append(
            f"largest activation {top['value']:.2f}: after layer {top['layer']}, channel {top['dim']}, on "
            f"{top['token']!r} (position {top['position']})"
        )
    top = s.get("top_module_activation")
    if top:
        lines.append(
            f"largest output of a hooked module {top['value']:.2f}: layer {top['layer']} {top['module']}, "
            f"channel {top['dim']}, on {top['token']!r} (position {top['position']})"
        )
    if s.get("loss_fp32") is not None:
        lines.append(
            f"{result.get('loss_kind', 'loss')}: fp32 {s['loss_fp32']:.4f}, W8A8 {_fmt(s['loss_w8a8'], '.4f')}, "
            f"gap {_fmt(s['w8a8_gap'], '+.4f')}"
        )
    if s.get("w8a8_hidden_rel_error") is not None:
        lines.append(
            f"W8A8 on the last layer's output: relative error {s['w8a8_hidden_rel_error']:.4f}, cosine of "
            f"mean-pooled embeddings {s['w8a8_embedding_cosine']:.4f}"
            + ("" if s.get("loss_fp32") is not None else " (no LM head in the checkpoint: no loss gap)")
        )
    return lines


OUTPUTS = ("results.json", "report.md")


def write_inspection(
    out_dir: str | Path, name: str, result: dict, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write results.json, report.md and the layer x head heat maps of one inspected model into
    ``out_dir`` (held with the run-folder lock; earlier results are refused unless ``overwrite``)."""
    from gatelab.lab.plots import plot_layer_head_heatmap
    from gatelab.lab.rundir import atomic_write_json, atomic_write_text, locked, refuse_existing
    from gatelab.lab.tables import markdown_table, to_json_safe

    first = result.get("first_token")
    special = [k for k in result.get("special_share", {}) if k != first]
    maps = {
        "sink_share_heads.png": (
            "sink_share",
            f"attention share of the first token{f' ({first})' if first else ''}",
            "share",
        ),
        "attn_entropy_heads.png": ("attn_entropy", "attention entropy", "nats"),
    }
    for token in special:
        safe = "".join(c if c.isalnum() else "_" for c in token).strip("_") or "token"
        maps[f"{safe}_share_heads.png"] = (("special_share", token), f"attention share of {token}", "share")
    with locked(out_dir) as folder:
        refuse_existing(folder, [*OUTPUTS, *maps], overwrite=overwrite)
        written = {}
        for file, (key, title, label) in maps.items():
            matrix = result[key[0]][key[1]] if isinstance(key, tuple) else result[key]
            if any(row is not None for row in matrix):
                written[file] = plot_layer_head_heatmap(matrix, folder / file, f"{name}: {title}", label)
        atomic_write_json(folder / "results.json", to_json_safe(result))
        header, rows = diagnostic_table(result)
        lines = [f"# gatelab inspect: {name}", ""]
        lines += [f"- {line}" for line in summary_lines(result)]
        for key, value in (result.get("model") or {}).items():
            lines.append(f"- model {key}: {value}")
        for key, value in (result.get("text") or {}).items():
            lines.append(f"- text {key}: {value}")
        lines += ["", markdown_table(header, rows), ""]
        lines += [f"![{file}]({file})" for file in written]
        atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")
        written.update({file: folder / file for file in OUTPUTS})
    return written


def inspect_run(
    run: str | Path,
    *,
    models: str = "*",
    task: str | None = None,
    corpus: str | None = None,
    batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    quantization: bool = True,
    say: Callable[[str], None] = print,
    on_result: Callable[[Path, str, dict], None] | None = None,
) -> tuple[dict[str, dict], int]:
    """The diagnostics (lab.diagnostics.diagnose) of every saved model of ``run`` (a model folder or a
    compare run folder), each on its task's validation batches. A model that cannot be read (torn file,
    unreadable summary, a corpus only the run folder names) is reported through ``say`` and skipped; the
    others go on. ``on_result(model_dir, task_name, result)`` sees each result as it comes. Returns
    ({model_dir: result or {"error": ...}}, the number skipped)."""
    from gatelab.lab.diagnostics import diagnose
    from gatelab.lab.models.lm import LM

    if batches < 1 or batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be positive, got {batches}, {batch_size}")
    everything, tasks, failed = {}, {}, 0
    for model_dir in find_model_dirs(run, models):
        try:  # one bad model must not hide the others
            check_inside(model_dir, Path(run))
            model = LM.load(model_dir, device=device)
            model_task = task_of(model_dir, task, tasks, corpus=corpus, say=say)
            if model_task.vocab_size > model.config.vocab_size:
                raise ValueError(
                    f"{model_dir}: task {model_task.name!r} has vocab_size {model_task.vocab_size}, the model "
                    f"only {model.config.vocab_size}"
                )
            result = diagnose(
                model,
                model_task.eval_batches(batches, batch_size, seed=seed),
                quantization=quantization,
                bos_token=model_task.bos_token,
            )
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            failed += 1
            everything[str(model_dir)] = {"error": f"{type(error).__name__}: {error}"}
            say(f"gatelab inspect: skipped {model_dir}: {error}")
            continue
        everything[str(model_dir)] = result
        if on_result is not None:
            on_result(model_dir, model_task.name, result)
    return everything, failed


def inspect_hf(
    path_or_name: str,
    *,
    text_file: str | None = None,
    seq_len: int = 128,
    batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    quantization: bool = True,
) -> tuple[str, dict]:
    """The diagnostics of a local transformers checkpoint (never downloaded) on ``batches * batch_size``
    windows of ``seq_len`` tokens of ``text_file`` (default: the standard library's module docstrings).
    Returns (the model's display name, the result, with its text and wall seconds recorded)."""
    import time

    from gatelab.hf.checkpoint import ALIASES, load_checkpoint
    from gatelab.lab.diagnostics.hf import default_text, diagnose_hf, needed_chars, text_digest, token_windows

    if seq_len < 3:
        raise ValueError(f"--seq-len must be at least 3, got {seq_len}")
    if batches < 1 or batch_size < 1:
        raise ValueError(f"--batches and --batch-size must be positive, got {batches}, {batch_size}")
    n = batches * batch_size
    if text_file is None:
        text, source = default_text(needed_chars(n, seq_len))
    else:
        path = Path(text_file)
        if not path.is_file():
            raise ValueError(f"--text {text_file!r}: no such file")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path.resolve())
    start = time.perf_counter()
    try:
        checkpoint = load_checkpoint(path_or_name, device=device)
    except ImportError as error:  # transformers missing: the CLI's one-line error, not a traceback
        raise ValueError(str(error)) from None
    limit = getattr(checkpoint.model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    windows = token_windows(checkpoint.tokenizer, text, checkpoint.kind, seq_len, n)
    result = diagnose_hf(checkpoint, windows, batch_size, quantization=quantization, seed=seed)
    result["text"] = {
        "source": source, "sha256": text_digest(text), "sequences": n, "seq_len": seq_len,
        "tokens": int(windows.numel()),
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    result["kind"] = checkpoint.kind
    name = ALIASES[path_or_name][2] if path_or_name in ALIASES else checkpoint.path.name
    return name, result
