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
from dataclasses import dataclass
from pathlib import Path

import torch

from gatelab.lab import rundir
from gatelab.lab.presets import Preset, get_preset
from gatelab.lab.spec import RunSpec, Variant, build, check_memory, parse_variants, split_list

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


def run_entry(spec, setting: str | None = None, lr_sweep: bool = False) -> dict:
    """The start of a run's results entry: its table (``task``: the setting's label, the task's name unless
    a grid point), the task's name, the mixer, the seed, and the learning rate."""
    entry = {"mixer": spec.label, "task": setting or spec.task, "seed": spec.seed, "status": "ok"}
    entry.update(task_name=spec.task, lr=spec.lr, early_stop=spec.early_stop)
    if not spec.vision:
        entry["arch"] = {"positions": spec.positions, "norm": spec.norm, "mlp": spec.mlp}
    return entry


def run_one(
    spec,
    task,
    run_dir: Path,
    progress: bool,
    kv_cache=None,
    overwrite: bool = False,
    setting: str | None = None,
    lr_sweep: bool = False,
) -> dict:
    """Train, evaluate and diagnose the run ``spec`` (a RunSpec) on ``task``; returns the results entry,
    whose table is ``setting`` (a grid point's label; None: the task), its model folder named with the
    learning rate when ``lr_sweep``. With ``kv_cache`` (kv.rows.KVCacheOptions) the trained model also
    decodes under each cache policy (entry["kv_cache"], outside the run's wall_s)."""
    from gatelab.lab.diagnostics import diagnose
    from gatelab.lab.diagnostics.compute import compute_summary
    from gatelab.lab.spec import folder_name
    from gatelab.lab.train import train
    from gatelab.lab.train.routing import routing_options

    entry = run_entry(spec, setting, lr_sweep)
    lr_part = f"__lr{spec.lr:g}" if lr_sweep else ""
    model_dir = (
        run_dir
        / "models"
        / f"{folder_name(spec.label)}__{folder_name(entry['task'])}__seed{spec.seed}{lr_part}"
    )
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
        steps=result.steps,
        stopped_early=result.stopped_early,
        tokens_per_s=result.tokens_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        peak_memory_kind=result.peak_memory_kind,
        params=model.num_parameters(),
        diagnostics={} if spec.vision else diagnose(model, batches, bos_token=task.bos_token),
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
    out = {k: getattr(preset, k) for k in keys}
    if preset.lrs:
        out["lrs"] = list(preset.learning_rates)
    if preset.early_stop is not None:
        out["early_stop"] = preset.early_stop
    return out


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: its RunSpec, the table it goes to (``setting``) and whether its setting
    sweeps learning rates."""

    spec: RunSpec
    setting: str
    lr_sweep: bool
    until_solved: bool = False  # skip this run when the same mixer already solved at an earlier lr

    @property
    def group(self) -> tuple:
        return (self.spec.seed, self.setting, self.spec.label)


def plan(preset: Preset, mixers: dict[str, list[Variant]], tasks: list[str], seeds: list[int], device: str,
         corpus: str | None = None, kv_cache=None,
         shard: tuple[int, int] = (0, 1)) -> tuple[dict, list[PlannedRun], dict]:  # fmt: skip
    """Build every setting's task (a task, or each point of its grid) and every (seed, setting, variant,
    learning rate) run, in the order they run, and check each against the memory available: everything is
    refused before the first minute of training. ``shard`` (k, n) keeps every n-th run from the k-th (runs
    split over processes, merged later). Returns (setting label -> task, [PlannedRun], setting label ->
    Setting)."""
    from gatelab.lab.tasks import make_task

    if corpus is not None and "text" not in tasks:
        raise ValueError(f"--corpus applies to the text task, which this comparison does not run ({tasks})")
    from gatelab.lab.tasks import VISION_TASKS

    if kv_cache is not None and set(tasks) & set(VISION_TASKS):
        raise ValueError(
            f"--kv-cache decodes LMs; drop the vision tasks {sorted(set(tasks) & set(VISION_TASKS))}"
        )
    built, settings = {}, {}
    for name in tasks:
        options = dict(preset.task_options.get(name, {}))
        if name == "text" and corpus is not None:
            if not Path(corpus).exists():
                raise FileNotFoundError(f"--corpus {corpus}: no such file or folder")
            options["corpus"] = str(corpus)
        for setting in preset.settings(name, options):
            settings[setting.label] = setting
            built[setting.label] = make_task(name, **setting.task_options)
            check_memory(setting.budget, built[setting.label], device)
            if kv_cache is not None and kv_cache.context > 1:
                from gatelab.lab.kv.rows import longer_task

                longer_task(built[setting.label], kv_cache.context)  # refuse before training, not after
    groups = [  # the learning rates of one (seed, setting, variant) stay together, in one shard
        [
            PlannedRun(
                setting.budget.run_spec(setting.task, variant, seed, device, setting.task_options, lr),
                label,
                len(setting.budget.learning_rates) > 1,
                setting.budget.lrs_until_solved,
            )
            for lr in setting.budget.learning_rates
        ]
        for seed in seeds
        for label, setting in settings.items()
        for variant in mixers[setting.task]
    ]
    k, n = shard
    return built, [run for group in groups[k::n] for run in group], settings


def parse_shard(text: str | None) -> tuple[int, int]:
    """``--shard K/N`` (1 <= K <= N) -> (K - 1, N): this process runs every N-th run from the K-th."""
    if text is None:
        return (0, 1)
    k, slash, n = str(text).partition("/")
    if not slash or not k.isdigit() or not n.isdigit() or not 1 <= int(k) <= int(n):
        raise ValueError(f"--shard must be K/N with 1 <= K <= N (e.g. 1/2), got {text!r}")
    return int(k) - 1, int(n)


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
    shard: tuple[int, int] = (0, 1),
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
    built, planned, settings = plan(preset, mixers, tasks, seeds, device, corpus, kv_cache, shard)
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
            "task_mixers": {label: [v.name for v in mixers[s.task]] for label, s in settings.items()},
            "task_config": {label: _budget(s.budget) for label, s in settings.items()},
            # the tables: one per task, or per point of a task's grid (a run's "task" is its table)
            "tasks": list(settings),
            "task_names": tasks,
            "grid": {label: {"task": s.task, **s.point} for label, s in settings.items() if s.point},
            "shard": list(shard) if shard != (0, 1) else None,
            "seeds": seeds,
            "device": device,
            "kv_cache": kv_cache.to_dict() if kv_cache is not None else None,
        },
        "environment": environment(device),
        "tasks": {label: task.describe() for label, task in built.items()},
        "skipped_mixers": skipped or {},
        "runs": [],
    }
    progress = sys.stderr.isatty()
    with rundir.locked(run_dir):
        rundir.refuse_existing(run_dir, RUN_FILES, overwrite=overwrite)
        start = time.perf_counter()
        counts = {}
        for run in planned:
            counts.setdefault(run.spec.task, set()).add(run.setting)
        console.print(
            f"[bold]gatelab compare[/] preset {preset.name}: "
            + ", ".join(
                f"{len(mixers[t])} mixers x {preset.for_task(t).steps} steps on {t}"
                + (f" ({len(counts.get(t, ()))} settings)" if t in preset.grid else "")
                + (f" x {len(preset.for_task(t).learning_rates)} lrs" if preset.for_task(t).lrs else "")
                for t in tasks
            )
            + f"; {len(seeds)} seed(s), {len(planned)} runs on {device} -> {run_dir}"
            + (f" (shard {shard[0] + 1}/{shard[1]})" if shard != (0, 1) else "")
        )
        if skipped:
            console.print("not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
        solved = set()  # (seed, setting, mixer) groups whose run at an earlier learning rate solved
        for i, run in enumerate(planned, 1):
            spec = run.spec
            if run.until_solved and run.group in solved:
                results["runs"].append({**run_entry(spec, run.setting, run.lr_sweep), "status": "skipped"})
                continue
            # escaped: rich would take a variant's options ("[gate=headwise]") for markup and drop them
            lr = f", lr {spec.lr:g}" if run.lr_sweep else ""
            what = (
                f"\\[{i}/{len(planned)}] {escape(spec.label)} on {escape(run.setting)} (seed {spec.seed}{lr})"
            )
            try:
                entry = run_one(
                    spec,
                    built[run.setting],
                    run_dir,
                    progress,
                    kv_cache,
                    overwrite,
                    run.setting,
                    run.lr_sweep,
                )
                final = entry["final"]
                acc = f", accuracy {final['accuracy']:.3f}" if "accuracy" in final else ""
                acc += f", Dice {final['dice']:.3f}" if "dice" in final else ""
                acc += f" (stopped at step {entry['steps']})" if entry.get("stopped_early") else ""
                if spec.early_stop is not None and final.get("accuracy", 0.0) >= spec.early_stop:
                    solved.add(run.group)  # stopped early, or reached it at the last step's evaluation
                console.print(
                    f"{what}: loss {final.get('loss', float('nan')):.3f}{acc}, "
                    f"{entry['tokens_per_s']:,.0f} tokens/s, {entry['wall_s']:.1f} s" + _kv_summary(entry)
                )
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # one broken mechanism must not sink the whole comparison
                entry = {**run_entry(spec, run.setting, run.lr_sweep), "status": "error"}
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


def apply_overrides(
    preset: Preset, *, lrs: str | list | None = None, early_stop: float | None = None, **values
) -> Preset:
    """The preset with command-line values (None = keep) set on the base and on every task's budget:
    positive ints (steps, batch_size, seeds), ``lrs`` (text "1e-4,1e-3" or a list: the learning rates of
    every run) and ``early_stop`` (an accuracy in (0, 1])."""
    from gatelab.lab.presets import check_lrs

    overrides = {}
    for name, value in values.items():
        if value is not None:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
            overrides[name] = value
    if "steps" in overrides:  # evaluations follow the new step count
        overrides["eval_every"] = min(preset.eval_every, overrides["steps"])
    if lrs is not None:
        if isinstance(lrs, str):
            try:
                lrs = [float(v) for v in split_list(lrs, "--lrs")]
            except ValueError:
                raise ValueError(
                    f"--lrs must be comma-separated learning rates, e.g. 1e-3,3e-3; got {lrs!r}"
                ) from None
        overrides["lrs"] = check_lrs(lrs, "--lrs")
        if not overrides["lrs"]:
            raise ValueError("--lrs must list at least one learning rate")
    if early_stop is not None:
        if isinstance(early_stop, bool) or not isinstance(early_stop, int | float) or not 0 < early_stop <= 1:
            raise ValueError(f"--early-stop must be an accuracy in (0, 1], got {early_stop!r}")
        overrides["early_stop"] = float(early_stop)
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
    lrs: str | list | None = None,
    early_stop: float | None = None,
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
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
    ``threads``: torch CPU threads for this process (None: torch's choice). The Zoology protocol: ``lrs``
    trains every run at each learning rate (text "1e-4,4.6e-4,2.2e-3,1e-2" or a list) and the table
    reports the best per mixer with the spread; ``early_stop`` stops a run when its validation accuracy
    reaches it (0.99). ``shard`` ("K/N" or (K - 1, N)) runs every N-th run from the K-th: split a
    comparison over processes, then merge their folders (:func:`gatelab.lab.merge`). ``workers`` > 1 does
    that here: as many processes of one CPU thread each, their folders under ``<run folder>/shards/``
    (with the models), merged into the run folder (None: the preset's, 1 with ``shard`` or ``threads``)."""
    if workers is None:
        base = get_preset(preset) if isinstance(preset, str) else preset
        workers = 1 if shard is not None or threads is not None else base.workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"--workers must be a positive int, got {workers!r}")
    if workers > 1:
        if shard is not None:
            raise ValueError("--workers splits the comparison into shards itself; drop --shard")
        return _compare_in_workers(
            workers, preset, mixers=mixers, tasks=tasks, seed=seed, seeds=seeds, steps=steps,
            batch_size=batch_size, device=device, corpus=corpus, kv_cache=kv_cache, mlp=mlp, arch=arch,
            lrs=lrs, early_stop=early_stop, out=out, name=name, overwrite=overwrite, command_line=command_line,
        )  # fmt: skip
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = apply_overrides(
        preset, steps=steps, batch_size=batch_size, seeds=seeds, lrs=lrs, early_stop=early_stop
    )
    shard = parse_shard(shard) if shard is None or isinstance(shard, str) else tuple(shard)
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
        overwrite=overwrite, shard=shard,
    )  # fmt: skip


def _compare_in_workers(workers: int, preset, *, out, name, overwrite, command_line, **options) -> dict:
    """:func:`compare` as ``workers`` processes (one CPU thread each, shards 1..N of the runs), then one
    report merged from their folders (``<run folder>/shards/<k>``) into the run folder."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from gatelab.lab.report import merge_results, print_tables

    preset = get_preset(preset) if isinstance(preset, str) else preset
    run_dir = Path(out) / (name or preset.name)
    rundir.refuse_existing(run_dir, RUN_FILES, overwrite=overwrite)
    shards_dir = run_dir / "shards"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [
            pool.submit(compare, preset, **options, shard=f"{k}/{workers}", threads=1, out=shards_dir,
                        name=str(k), overwrite=overwrite, command_line=f"{command_line} (shard {k}/{workers})")
            for k in range(1, workers + 1)
        ]  # fmt: skip
        parts = [job.result() for job in jobs]
    merged = merge_results([shards_dir / str(k) for k in range(1, workers + 1)], run_dir, run_dir.name,
                           overwrite=True)  # fmt: skip
    print_tables(merged)
    walls = ", ".join(f"{p['wall_s']:.0f}" for p in parts)
    print(f"wrote {run_dir / 'report.md'} from {workers} worker processes ({walls} s)")
    return merged
