"""``gatelab compare``: train a set of mixers on the lab's tasks under one budget and seed, evaluate and
diagnose them, print a table and write runs/<name>/ (report.md, results.json, plots, saved models)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gatelab.cli import command
from gatelab.lab.kv.rows import failures as kv_failures
from gatelab.lab.kv.rows import parse_options
from gatelab.lab.presets import PRESETS, Preset, get_preset

PREFERRED = ("softmax", "gated_softmax", "clipped_softmax")  # first in every default comparison
MEMORY_FRACTION = 0.8  # refuse sizes whose estimate exceeds this share of the available memory


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def select_mixers(requested: list[str] | None, preset: Preset) -> tuple[list[str], dict[str, str]]:
    """The mixers to compare and those left out (key -> why).

    Explicit ``requested`` keys must all be registered causal mechanisms (else a ValueError naming the
    known ones). Otherwise the preset's list, or: softmax, gated_softmax, clipped_softmax, then every
    other causal mechanism in the registry at run time, sorted by key.
    """
    from gatelab.registry import list_mechanisms

    causal = {s.key for s in list_mechanisms(causal=True)}
    known = {s.key for s in list_mechanisms()}
    if requested is not None:
        for key in requested:
            if key not in known:
                raise ValueError(f"unknown mixer {key!r}; causal mixers: {', '.join(sorted(causal))}")
            if key not in causal:
                raise ValueError(f"mixer {key!r} is not causal and cannot run in the decoder LM")
        if len(set(requested)) != len(requested):
            raise ValueError(f"--mixers lists a mixer twice: {requested}")
        return list(requested), {}
    wanted = list(preset.mixers) if preset.mixers else list(PREFERRED) + sorted(causal - set(PREFERRED))
    chosen = [k for k in wanted if k in causal]
    skipped = {k: "not in the registry" for k in wanted if k not in known}
    skipped.update({k: "not causal" for k in wanted if k in known and k not in causal})
    return chosen, skipped


def select_tasks(requested: list[str] | None, preset: Preset) -> list[str]:
    from gatelab.lab.tasks import TASK_NAMES

    tasks = requested if requested is not None else list(preset.tasks)
    for name in tasks:
        if name not in TASK_NAMES:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks lists a task twice: {tasks}")
    return tasks


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a valid torch device: {error}") from None
    return device


def available_memory(device: str) -> int:
    """Bytes free for this run: free GPU memory, or the available RAM."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate_memory(preset: Preset, seq_len: int, vocab_size: int) -> int:
    """A generous estimate of the peak bytes of one training run and its diagnostics (fp32): the
    activations kept for backward (a dense (T, T) attention matrix per head included, as reference and
    linear-attention paths build), the logits and their gradient, parameters with AdamW state."""
    B, T, L, d, H = preset.batch_size, seq_len, preset.n_layers, preset.d_model, preset.n_heads
    activations = B * T * L * (40 * d + 3 * H * T) * 4
    logits = 3 * B * T * vocab_size * 4
    diagnostics = preset.diag_batch_size * T * L * (2 * H * T + 8 * d) * 4 * 2
    params = (vocab_size * d + L * 16 * d * d) * 4 * 4
    return activations + logits + diagnostics + params


def check_memory(preset: Preset, task, device: str, available: int | None = None) -> None:
    need = estimate_memory(preset, task.seq_len, task.vocab_size)
    available = available_memory(device) if available is None else available
    if need > MEMORY_FRACTION * available:
        raise ValueError(
            f"task {task.name!r} at batch {preset.batch_size}, seq_len {task.seq_len}, d_model {preset.d_model}, "
            f"{preset.n_layers} layers needs about {need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
            f"{available / 2**30:.1f} GiB available on {device}; lower --batch-size or use a smaller preset"
        )


def environment(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": f"{cpu}, {os.cpu_count()} CPUs",
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_one(
    mixer: str, task, task_name: str, seed: int, preset: Preset, device: str, run_dir: Path, progress: bool,
    kv_cache=None,
):  # fmt: skip
    """Train, evaluate and diagnose one mixer on one task with one seed; returns the results entry.
    With ``kv_cache`` (compare_kv.KVCacheOptions) the trained model also decodes under each cache policy
    (entry["kv_cache"], outside the run's wall_s)."""
    from gatelab.lab.diagnostics import diagnose
    from gatelab.lab.models.lm import LM, LMConfig
    from gatelab.lab.train import TrainConfig, train

    entry = {"mixer": mixer, "task": task_name, "seed": seed, "status": "ok"}
    model_dir = run_dir / "models" / f"{mixer}__{task_name}__seed{seed}"
    t0 = time.perf_counter()
    config = LMConfig(
        vocab_size=task.vocab_size,
        d_model=preset.d_model,
        n_layers=preset.n_layers,
        n_heads=preset.n_heads,
        pattern=mixer,
        mixer_options=preset.mixer_options,
        max_seq_len=task.seq_len,
        seed=seed,
    )
    model = LM(config).to(device)
    train_config = TrainConfig(
        steps=preset.steps,
        batch_size=preset.batch_size,
        lr=preset.lr,
        min_lr_ratio=preset.min_lr_ratio,
        warmup=min(preset.warmup, preset.steps - 1),
        eval_every=preset.eval_every,
        eval_batches=preset.eval_batches,
        eval_batch_size=preset.eval_batch_size,
        seed=seed,
        device=device,
        out_dir=str(model_dir),
        progress=progress,
    )
    result = train(model, task, train_config)
    batches = task.eval_batches(preset.diag_batches, preset.diag_batch_size, seed=seed)
    entry.update(
        final=result.final,
        history=result.history,
        train_wall_s=result.wall_s,
        tokens_per_s=result.tokens_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        peak_memory_kind=result.peak_memory_kind,
        params=model.num_parameters(),
        diagnostics=diagnose(model, batches),
        task_info=task.describe(),
        model_dir=str(model_dir.relative_to(run_dir)),
    )
    entry["wall_s"] = time.perf_counter() - t0
    if kv_cache is not None:
        from gatelab.lab.kv.rows import evaluate_run

        entry.update(evaluate_run(model, task, batches, kv_cache, batch_size=preset.batch_size, seed=seed))
    return entry


def _budget(preset: Preset) -> dict:
    keys = (
        "d_model",
        "n_layers",
        "n_heads",
        "steps",
        "batch_size",
        "lr",
        "min_lr_ratio",
        "warmup",
        "eval_every",
    )
    return {k: getattr(preset, k) for k in keys}


def run_compare(
    preset: Preset,
    mixers: dict[str, list[str]],
    tasks: list[str],
    seeds: list[int],
    device: str,
    run_dir: Path,
    *,
    corpus: str | None = None,
    skipped: dict | None = None,
    command_line: str = "",
    console=None,
    kv_cache=None,
) -> dict:
    """Run the comparison and write the report; returns the results dict (as in results.json).

    ``preset`` is the budget before per-task overrides; ``mixers`` maps each task to the mixers run on it;
    ``kv_cache`` (compare_kv.KVCacheOptions or None) adds the KV-cache policies' decoding of every run.
    """
    import json

    from rich.console import Console

    from gatelab.lab.report import print_tables, to_json_safe, write_report
    from gatelab.lab.tasks import make_task

    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in tasks:  # build (and size-check) every task before the first minute of training
        options = dict(preset.task_options.get(name, {}))
        if name == "text" and corpus is not None:
            if not Path(corpus).exists():
                raise FileNotFoundError(f"--corpus {corpus}: no such file or folder")
            options["corpus"] = str(corpus)
        built[name] = make_task(name, **options)
        check_memory(preset.for_task(name), built[name], device)
        if kv_cache is not None and kv_cache.context > 1:
            from gatelab.lab.kv.rows import longer_task

            longer_task(built[name], kv_cache.context)  # refuse before training, not after
    results = {
        "name": run_dir.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line,
        "config": {
            **{
                k: v
                for k, v in preset.to_dict().items()
                if k not in ("name", "mixers", "tasks", "seeds", "task_overrides")
            },
            "preset": preset.name,
            "mixers": list(dict.fromkeys(m for t in tasks for m in mixers[t])),
            "task_mixers": mixers,
            "task_config": {t: _budget(preset.for_task(t)) for t in tasks},
            "tasks": tasks,
            "seeds": seeds,
            "device": device,
            "kv_cache": kv_cache.to_dict() if kv_cache is not None else None,
        },
        "environment": environment(device),
        "tasks": {name: task.describe() for name, task in built.items()},
        "skipped_mixers": skipped or {},
        "runs": [],
    }
    total = sum(len(mixers[t]) for t in tasks) * len(seeds)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    console.print(
        f"[bold]gatelab compare[/] preset {preset.name}: "
        + ", ".join(f"{len(mixers[t])} mixers x {preset.for_task(t).steps} steps on {t}" for t in tasks)
        + f"; {len(seeds)} seed(s), {total} runs on {device} -> {run_dir}"
    )
    if skipped:
        console.print("not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    i = 0
    for seed in seeds:
        for task_name in tasks:
            for mixer in mixers[task_name]:
                i += 1
                try:
                    budget = preset.for_task(task_name)
                    entry = run_one(
                        mixer, built[task_name], task_name, seed, budget, device, run_dir, progress, kv_cache
                    )
                    final = entry["final"]
                    acc = f", accuracy {final['accuracy']:.3f}" if "accuracy" in final else ""
                    console.print(
                        f"[{i}/{total}] {mixer} on {task_name} (seed {seed}): loss {final.get('loss', float('nan')):.3f}"
                        f"{acc}, {entry['tokens_per_s']:,.0f} tokens/s, {entry['wall_s']:.1f} s"
                        + _kv_summary(entry)
                    )
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as error:  # one broken mechanism must not sink the whole comparison
                    entry = {"mixer": mixer, "task": task_name, "seed": seed, "status": "error"}
                    entry["error"] = f"{type(error).__name__}: {error}"
                    console.print(
                        f"[{i}/{total}] [red]{mixer} on {task_name} (seed {seed}) failed: {entry['error']}[/]"
                    )
                results["runs"].append(entry)
                results["wall_s"] = time.perf_counter() - start
                (run_dir / "results.json").write_text(json.dumps(to_json_safe(results), indent=1))
    results["wall_s"] = time.perf_counter() - start
    paths = write_report(run_dir, results)
    from gatelab.lab.report import aggregate

    results["aggregate"] = aggregate(results["runs"])
    print_tables(results, console)
    console.print(f"wrote {paths['report']} ({results['wall_s']:.0f} s)")
    return results


def _kv_summary(entry: dict) -> str:
    if entry.get("kv_cache_note"):
        return "; no KV cache"
    rows = entry.get("kv_cache")
    if not rows:
        return ""
    failed = sum("error" in row for row in rows)
    return f"; KV cache: {len(rows)} policy rows in {entry['kv_cache_wall_s']:.1f} s" + (
        f", [red]{failed} failed[/]" if failed else ""
    )


def apply_overrides(preset: Preset, **values) -> Preset:
    """The preset with command-line values (None = keep) set on the base and on every task's budget."""
    overrides = {}
    for name, value in values.items():
        if value is not None:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
            overrides[name] = value
    if "steps" in overrides:  # evaluations follow the new step count
        overrides["eval_every"] = min(preset.eval_every, overrides["steps"])
    dropped = set(overrides) | ({"eval_every"} if "steps" in overrides else set())
    task_overrides = {
        task: {k: v for k, v in changes.items() if k not in dropped}
        for task, changes in preset.task_overrides.items()
    }
    return preset.replace(**overrides, task_overrides=task_overrides)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="budget and sizes (default: default)"
    )
    parser.add_argument(
        "--mixers", default=None, help="comma-separated mixer keys (default: the preset's / every causal one)"
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated tasks: mqar, text, idle (default: the preset's)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (overrides the preset)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (overrides the preset)")
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed; the preset's number of seeds follow it"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    parser.add_argument(
        "--corpus", default=None, help="text file or folder for the text task (default: the stdlib)"
    )
    parser.add_argument("--name", default=None, help="run folder name (default: the preset's name)")
    parser.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--kv-cache", default=None,
        help="also decode each trained softmax-family model under these KV-cache policies: comma-separated "
        "streaming, h2o, attention_gate ('full' is always the reference row; default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-budgets", default=None,
        help="KV-cache budgets as fractions in (0, 1] of the sequence length (default: 0.5,0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-gate-steps", type=int, default=None,
        help="fine-tuning steps of the attention gates per budget (default: 100)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-context", type=int, default=None,
        help="decode sequences this many times the training length (default: 1, the training length)",
    )  # fmt: skip


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: every option given a value other than its default."""
    parser = argparse.ArgumentParser()
    _arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = [
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in defaults and v != defaults[k]
    ]
    return " ".join(["gatelab compare", *parts])


@command("compare", _arguments)
def cmd_compare(args: argparse.Namespace) -> int:
    """Train and compare mixers on the lab's tasks; write report.md, results.json and plots."""
    preset = apply_overrides(
        get_preset(args.preset), steps=args.steps, batch_size=args.batch_size, seeds=args.seeds
    )
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    tasks = select_tasks(_split(args.tasks), preset)
    mixers, skipped = {}, {}
    for task in tasks:  # --mixers applies to every task; else each task's preset list
        mixers[task], task_skipped = select_mixers(_split(args.mixers), preset.for_task(task))
        skipped.update(task_skipped)
        if not mixers[task]:
            raise ValueError(f"no mixer to compare on {task}: none of the requested mechanisms is registered")
    kv_cache = parse_options(args.kv_cache, args.kv_budgets, args.kv_gate_steps, args.kv_context)
    device = resolve_device(args.device)
    run_dir = Path(args.out) / (args.name or preset.name)
    seeds = list(range(args.seed, args.seed + preset.seeds))
    results = run_compare(
        preset, mixers, tasks, seeds, device, run_dir,
        corpus=args.corpus, skipped=skipped, command_line=_command_line(args), kv_cache=kv_cache,
    )  # fmt: skip
    return 0 if all(r["status"] == "ok" for r in results["runs"]) and not kv_failures(results["runs"]) else 1
