"""``gatelab compare`` as a library call: train a set of variants on the lab's tasks under one budget per
task and seed, evaluate and diagnose them, print a table and write the run folder (report.md, results.json,
plots, saved models).

    >>> import gatelab.lab
    >>> results = gatelab.lab.compare("quick", mixers="softmax,gated_softmax[gate=headwise]", tasks=["mqar"])
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gatelab.lab import rundir
from gatelab.lab.presets import Preset, get_preset
from gatelab.lab.spec import Variant, build, check_memory, parse_variants, split_list

PREFERRED = ("softmax", "gated_softmax", "clipped_softmax")  # first in every default comparison
RUN_FILES = ("results.json", "models")  # what an earlier comparison left in its folder


def select_mixers(
    requested: str | list | None, preset: Preset, task: str | None = None
) -> tuple[list[Variant], dict[str, str]]:
    """The variants to compare and the preset's mixers left out (key -> why).

    ``requested``: ``--mixers`` text ("softmax,gated_softmax[gate=headwise]"), a list of keys, variant texts
    or Variants; every key must be a registered causal mechanism (else a ValueError naming the known ones).
    None: the preset's list, or softmax, gated_softmax, clipped_softmax, then every other causal mechanism
    in the registry at run time, sorted by key. On a vision ``task`` (digits, digits_seg) the keys are the
    vision backbone's blocks instead (see :func:`select_vision_blocks`)."""
    from gatelab.lab.tasks import VISION_TASKS
    from gatelab.registry import get, list_mechanisms

    if task in VISION_TASKS:
        return select_vision_blocks(requested, preset, task)

    causal = {s.key for s in list_mechanisms(causal=True)}
    known = {s.key for s in list_mechanisms()}
    gates = {s.key for s in list_mechanisms(family="gate")}
    if requested is not None:
        variants = parse_variants(requested)
        for variant in variants:
            if variant.key not in known:
                raise ValueError(f"unknown mixer {variant.key!r}; causal mixers: {', '.join(sorted(causal))}")
            if variant.key in gates:
                role = get(variant.key).extra.get("role")
                use = (
                    f"an MoE router runs as --mlp moe:{variant.key}"
                    if role == "moe_router"
                    else ("it works on a (B, N, d) stream with a query (a module, see its docstring)")
                )
                raise ValueError(f"{variant.key!r} is a gate, not a mixer; {use}")
            if variant.key not in causal:
                raise ValueError(f"mixer {variant.key!r} is not causal and cannot run in the decoder LM")
        return variants, {}
    wanted = list(preset.mixers) if preset.mixers else list(PREFERRED) + sorted(causal - set(PREFERRED))
    keys = {text: text.partition("[")[0].strip() for text in wanted}
    chosen = parse_variants([text for text in wanted if keys[text] in causal])
    skipped = {text: "not in the registry" for text in wanted if keys[text] not in known}
    skipped.update(
        {text: "not causal" for text in wanted if keys[text] in known and keys[text] not in causal}
    )
    return chosen, skipped


def select_vision_blocks(requested, preset: Preset, task: str) -> tuple[list[Variant], dict[str, str]]:
    """The blocks of the vision backbone to compare on ``task``: "cnn" (no gate), each vision gate, each
    registered (B, H, W, C) mixer (lab.models.vision.vision_blocks); None: the preset's list, or all."""
    from gatelab.lab.models.vision import vision_blocks
    from gatelab.lab.tasks import _tasks

    known = vision_blocks(_tasks()[task].segment)
    if requested is not None:
        variants = parse_variants(requested)
        for variant in variants:
            if variant.key not in known:
                raise ValueError(f"{variant.key!r} does not run on {task}; its blocks: {', '.join(known)}")
        return variants, {}
    wanted = list(preset.mixers) if preset.mixers else known
    keys = {text: text.partition("[")[0].strip() for text in wanted}
    skipped = {text: f"not a block of the {task} backbone" for text in wanted if keys[text] not in known}
    return parse_variants([text for text in wanted if keys[text] in known]), skipped


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
    """``device`` checked against this machine by the trainer's own check (so a missing GPU is refused before
    the first run, not by each run); "auto": cuda if available, else cpu."""
    from gatelab.lab.train import check_device

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(device)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--device: {error}") from None
    return device


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


def run_one(spec, task, run_dir: Path, progress: bool, kv_cache=None, overwrite: bool = False) -> dict:
    """Train, evaluate and diagnose the run ``spec`` (a RunSpec) on ``task``; returns the results entry.
    With ``kv_cache`` (kv.rows.KVCacheOptions) the trained model also decodes under each cache policy
    (entry["kv_cache"], outside the run's wall_s)."""
    from gatelab.lab.diagnostics import diagnose
    from gatelab.lab.diagnostics.compute import compute_summary
    from gatelab.lab.spec import folder_name
    from gatelab.lab.train import train
    from gatelab.lab.train.routing import routing_options

    entry = {"mixer": spec.label, "task": spec.task, "seed": spec.seed, "status": "ok"}
    if not spec.vision:
        entry["arch"] = {"positions": spec.positions, "norm": spec.norm, "mlp": spec.mlp}
    model_dir = run_dir / "models" / f"{folder_name(spec.label)}__{spec.task}__seed{spec.seed}"
    t0 = time.perf_counter()
    _, model, train_config = build(spec, task, model_dir, overwrite=overwrite, progress=progress)
    model = model.to(spec.device)
    result = train(model, task, train_config, **routing_options(model, train_config))
    batches = task.eval_batches(spec.diag_batches, spec.diag_batch_size, seed=spec.seed)
    if spec.vision:  # the diagnostics read an LM's residual stream and attention; a CNN has neither
        entry["images_per_s"] = result.tokens_per_s / task.image_size**2  # tokens/s counts input pixels
    entry.update(
        final=result.final,
        history=result.history,
        train_wall_s=result.wall_s,
        tokens_per_s=result.tokens_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        peak_memory_kind=result.peak_memory_kind,
        params=model.num_parameters(),
        diagnostics={} if spec.vision else diagnose(model, batches),
        moe=None if spec.vision else moe_summary(model, batches),
        compute=None
        if spec.vision
        else compute_summary(model, batches),  # after training: not in train_wall_s
        task_info=task.describe(),
        model_dir=str(model_dir.relative_to(run_dir)),
    )
    entry["wall_s"] = time.perf_counter() - t0
    if kv_cache is not None:
        from gatelab.lab.kv.rows import evaluate_run

        entry.update(evaluate_run(model, task, batches, kv_cache, batch_size=spec.batch_size, seed=spec.seed))
    return entry


@torch.no_grad()
def moe_summary(model, batches) -> dict | None:
    """The MoE layers' expert load (max / mean, coefficient of variation), active-expert fraction, dropped
    assignments and aux loss, averaged over layers and the validation ``batches``; None without MoE."""
    from gatelab.gates.moe import moe_layers, moe_stats

    if not moe_layers(model) or not batches:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for inputs, _ in batches:
        model(inputs.to(device))
        rows.append(moe_stats(model))
    model.train(was_training)
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


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


def plan(preset: Preset, mixers: dict[str, list[Variant]], tasks: list[str], seeds: list[int], device: str,
         corpus: str | None = None, kv_cache=None) -> tuple[dict, list]:  # fmt: skip
    """Build every task and the RunSpec of every (seed, task, variant) run, in the order they run, and check
    each against the memory available: everything is refused before the first minute of training.
    Returns (task name -> task, [RunSpec])."""
    from gatelab.lab.tasks import make_task

    if corpus is not None and "text" not in tasks:
        raise ValueError(f"--corpus applies to the text task, which this comparison does not run ({tasks})")
    from gatelab.lab.tasks import VISION_TASKS

    if kv_cache is not None and set(tasks) & set(VISION_TASKS):
        raise ValueError(
            f"--kv-cache decodes LMs; drop the vision tasks {sorted(set(tasks) & set(VISION_TASKS))}"
        )
    built, options = {}, {}
    for name in tasks:
        options[name] = dict(preset.task_options.get(name, {}))
        if name == "text" and corpus is not None:
            if not Path(corpus).exists():
                raise FileNotFoundError(f"--corpus {corpus}: no such file or folder")
            options[name]["corpus"] = str(corpus)
        built[name] = make_task(name, **options[name])
        check_memory(preset.for_task(name), built[name], device)
        if kv_cache is not None and kv_cache.context > 1:
            from gatelab.lab.kv.rows import longer_task

            longer_task(built[name], kv_cache.context)  # refuse before training, not after
    specs = [
        preset.run_spec(task, variant, seed, device, task_options=options[task])
        for seed in seeds
        for task in tasks
        for variant in mixers[task]
    ]
    return built, specs


def run_compare(
    preset: Preset,
    mixers: dict[str, list[Variant]],
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
    overwrite: bool = False,
) -> dict:
    """Run the comparison and write the report; returns the results dict (as in results.json).

    ``preset`` is the budget before per-task overrides; ``mixers`` maps each task to the variants run on it;
    ``kv_cache`` (kv.rows.KVCacheOptions or None) adds the KV-cache policies' decoding of every run. The run
    folder is locked for the whole comparison, and one holding an earlier comparison is refused unless
    ``overwrite``."""
    from rich.console import Console
    from rich.markup import escape

    from gatelab.lab.report import aggregate, print_tables, to_json_safe, write_report

    console = console or Console()
    run_dir = Path(run_dir)
    built, specs = plan(preset, mixers, tasks, seeds, device, corpus, kv_cache)
    variants = {v.name: v.to_dict() for t in tasks for v in mixers[t]}
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
            "mixers": list(variants),
            "variants": variants,
            "task_mixers": {t: [v.name for v in mixers[t]] for t in tasks},
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
    progress = sys.stderr.isatty()
    with rundir.locked(run_dir):
        rundir.refuse_existing(run_dir, RUN_FILES, overwrite=overwrite)
        start = time.perf_counter()
        console.print(
            f"[bold]gatelab compare[/] preset {preset.name}: "
            + ", ".join(f"{len(mixers[t])} mixers x {preset.for_task(t).steps} steps on {t}" for t in tasks)
            + f"; {len(seeds)} seed(s), {len(specs)} runs on {device} -> {run_dir}"
        )
        if skipped:
            console.print("not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
        for i, spec in enumerate(specs, 1):
            # escaped: rich would take a variant's options ("[gate=headwise]") for markup and drop them
            what = f"\\[{i}/{len(specs)}] {escape(spec.label)} on {spec.task} (seed {spec.seed})"
            try:
                entry = run_one(spec, built[spec.task], run_dir, progress, kv_cache, overwrite)
                final = entry["final"]
                acc = f", accuracy {final['accuracy']:.3f}" if "accuracy" in final else ""
                acc += f", Dice {final['dice']:.3f}" if "dice" in final else ""
                console.print(
                    f"{what}: loss {final.get('loss', float('nan')):.3f}{acc}, "
                    f"{entry['tokens_per_s']:,.0f} tokens/s, {entry['wall_s']:.1f} s" + _kv_summary(entry)
                )
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # one broken mechanism must not sink the whole comparison
                entry = {"mixer": spec.label, "task": spec.task, "seed": spec.seed, "status": "error"}
                entry["error"] = f"{type(error).__name__}: {error}"
                console.print(f"{what} [red]failed: {entry['error']}[/]")
            results["runs"].append(entry)
            results["wall_s"] = time.perf_counter() - start
            rundir.atomic_write_json(run_dir / "results.json", to_json_safe(results))
        results["wall_s"] = time.perf_counter() - start
        paths = write_report(run_dir, results)
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


def compare(
    preset: str | Preset = "default",
    *,
    mixers: str | list | None = None,
    tasks: list[str] | None = None,
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    corpus: str | None = None,
    kv_cache=None,
    mlp: str | list | None = None,
    arch: str | list | None = None,
    out: str | Path = "runs",
    name: str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    command_line: str = "",
    console=None,
) -> dict:
    """Train and compare ``mixers`` (see :func:`select_mixers`) on ``tasks`` (default: the preset's) with
    ``seeds`` seeds from ``seed`` on, under ``preset`` (a name or a Preset; ``steps`` / ``batch_size`` /
    ``seeds`` override it on every task); write ``out/<name or preset name>/`` and return the results (as
    in its results.json). ``mlp``: MLP choices ("swiglu", "moe:<router>"; text or list) run with every
    variant, e.g. "swiglu,moe:topk,moe:comet" (None: each variant's own, SwiGLU by default). ``arch``:
    architectures (keys of lm.ARCHITECTURES, "gpt2,llama"; text or list) crossed with every variant after
    ``mlp`` (an MLP other than SwiGLU stays; None: each variant's own). ``kv_cache``: a
    kv.rows.KVCacheOptions (see kv.rows.parse_options) or None;
    ``threads``: torch CPU threads for this process (None: torch's choice)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = apply_overrides(preset, steps=steps, batch_size=batch_size, seeds=seeds)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"--threads must be a positive int, got {threads}")
        torch.set_num_threads(threads)
    tasks = select_tasks(tasks, preset)
    chosen, skipped = {}, {}
    for task in tasks:  # --mixers applies to every task; else each task's preset list
        chosen[task], task_skipped = select_mixers(mixers, preset.for_task(task), task)
        skipped.update(task_skipped)
        if mlp is not None:
            mlps = split_list(mlp, "--mlp") if isinstance(mlp, str) else list(mlp)
            chosen[task] = parse_variants([v.with_mlp(m) for v in chosen[task] for m in mlps])
        if arch is not None:
            archs = split_list(arch, "--arch") if isinstance(arch, str) else list(arch)
            chosen[task] = parse_variants([v.with_arch(a) for v in chosen[task] for a in archs])
        if not chosen[task]:
            raise ValueError(f"no mixer to compare on {task}: none of the requested mechanisms is registered")
    device = resolve_device(device)
    run_dir = Path(out) / (name or preset.name)
    return run_compare(
        preset, chosen, tasks, list(range(seed, seed + preset.seeds)), device, run_dir,
        corpus=corpus, skipped=skipped, command_line=command_line, console=console, kv_cache=kv_cache,
        overwrite=overwrite,
    )  # fmt: skip
