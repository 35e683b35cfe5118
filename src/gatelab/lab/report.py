"""The report of ``gatelab compare``: results.json, PNG plots (matplotlib, Agg) and report.md with the
table and the plots embedded; also the rich table printed on the terminal."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .rundir import atomic_write_json, atomic_write_text
from .tables import finite, format_cell, markdown_table, mean_std, rich_table, to_json_safe

# (key, header, format): one column of the comparison table, read from run_metrics(run)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "eval loss", ".3f"),
    ("accuracy", "accuracy", ".3f"),
    ("sink_share", "sink share", ".3f"),
    ("bos_share", "BOS share", ".3f"),
    ("attn_entropy", "attn entropy", ".2f"),
    ("max_activation", "max act", ".1f"),
    ("massive_ratio", "act max/median", ".0f"),
    ("max_inf_norm", "inf-norm", ".1f"),
    ("avg_kurtosis", "kurtosis", ".1f"),
    ("w8a8_gap", "W8A8 gap", "+.3f"),
    ("gate_mean", "gate mean", ".3f"),
    ("gate_frac_below", "gate < 0.1", ".2f"),
    ("expert_load", "expert load", ".2f"),
    ("active_experts", "active experts", ".2f"),
    ("moe_aux", "MoE aux", ".4f"),
    ("routed", "routed expensive", ".2f"),
    ("flops_per_token", "FLOPs/token", ",.0f"),
    ("decode_ms", "decode ms/token", ".2f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("params", "params", ",.0f"),
    ("wall_s", "wall s", ".1f"),
)

# the vision tasks' table: the LM diagnostics do not apply to a CNN; Dice on digits_seg
VISION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "eval loss", ".3f"),
    ("accuracy", "accuracy", ".3f"),
    ("dice", "Dice", ".3f"),
    ("images_per_s", "images/s", ".0f"),
    ("params", "params", ",.0f"),
    ("wall_s", "wall s", ".1f"),
)


def columns(task: str) -> tuple[tuple[str, str, str], ...]:
    """The columns of ``task``'s table."""
    from gatelab.lab.tasks import VISION_TASKS

    return VISION_COLUMNS if task in VISION_TASKS else COLUMNS


COLUMN_NOTES = (
    "eval loss / accuracy: final evaluation (accuracy at labelled positions, mqar and idle); "
    "sink share: the largest layer's mean share of attention on the first token (uniform attention would "
    "give the baseline in the task's heading); BOS share (text with bos on): the largest layer's mean share "
    "of attention on the keys holding BOS (position 0 and every document start in the window; '-' for a "
    "task without BOS); attn entropy: mean over attention layers (nats); "
    "max act: largest absolute activation of the residual stream after any block, and act max/median its ratio to "
    "the median absolute activation of that layer; inf-norm / kurtosis: Quantizable Transformers' measures, "
    "per-sequence infinity norm (max over blocks) and Pearson kurtosis (mean over blocks) of each block's "
    "output, averaged over the validation sequences; W8A8 gap: eval loss after int8 fake quantisation of "
    "every linear layer's weights and inputs minus the fp32 loss; gate mean / gate < 0.1: mean gate value "
    "and fraction below 0.1 over gated layers, read from each mixer's internals['gate'] as it gives them "
    "(a linear, unbounded gate such as lightning's default can be negative); sink share and entropy of a "
    "linear mixer read its equivalent T x T matrix as shares of absolute weight; '-': the mixer has no such "
    "internals; expert load / active experts / MoE aux (runs with an MoE MLP only): the busiest expert's "
    "assignments over the mean, the mean fraction of experts a token uses, and the router's auxiliary loss "
    "(load balance and its own), averaged over MoE layers and the diagnostics batches. Vision tasks (digits, "
    "digits_seg): accuracy per held-out image or pixel, Dice averaged over the ten digit classes, images/s of "
    "training; the block (gate or mixer) is named in the mixer column. routed expensive (router mixers only): the "
    "fraction of tokens / heads / layers / chunks sent to the expensive (softmax / full) path on the "
    "diagnostics batches, mean over router layers; FLOPs/token: forward FLOPs per token of the LM at the "
    "task's length (gatelab.routers.flops defines the counts; '-': a mixer without a count); decode ms/token: "
    "wall-clock time of one decoding step (batch 1, teacher-forced, second half of two sequences, on the "
    "run's device)."
)
SWEEP_NOTES = (
    "With a learning-rate sweep (Zoology's protocol) every row reports the mixer at its best learning rate "
    "(best lr: the best mean over seeds of the accuracy, or of the eval loss on text); over lrs: the range of "
    "that mean across the learning rates. With early stopping, solved: the fraction of seeds whose final "
    "accuracy reached the threshold (a run stops at the first evaluation that does; 0 means not solved "
    "within the budget) and steps: the steps trained."
)
MOE_COLUMNS = ("expert_load", "active_experts", "moe_aux")  # shown only where some run has an MoE MLP
# "bos_share" is shown only where some run has a BOS share, "routed" only where some run routes


def run_metrics(run: dict) -> dict[str, float | None]:
    """The table's numbers for one (mixer, task, seed) run."""
    final = run.get("final") or {}
    summary = (run.get("diagnostics") or {}).get("summary") or {}
    out = {
        "loss": finite(final.get("loss")),
        "accuracy": finite(final.get("accuracy")),
        "dice": finite(final.get("dice")),
        "tokens_per_s": finite(run.get("tokens_per_s")),
        "images_per_s": finite(run.get("images_per_s")),
        "params": finite(run.get("params")),
        "wall_s": finite(run.get("wall_s")),
    }
    compute = run.get("compute") or {}
    out.update(
        routed=finite((compute.get("route") or {}).get("expensive_fraction")),
        flops_per_token=finite(compute.get("flops_per_token")),
        decode_ms=finite(compute.get("decode_ms_per_token")),
    )
    moe = run.get("moe") or {}
    out.update(
        expert_load=finite(moe.get("load_max_over_mean")),
        active_experts=finite(moe.get("active_fraction")),
        moe_aux=finite(moe.get("aux_loss")),
    )
    threshold = run.get("early_stop")
    accuracy = out["accuracy"]
    out["solved"] = None if threshold is None or accuracy is None else float(accuracy >= threshold)
    out["steps"] = finite(run.get("steps"))
    for key in (
        "sink_share", "bos_share", "attn_entropy", "max_activation", "massive_ratio", "max_inf_norm", "avg_kurtosis",
        "w8a8_gap", "gate_mean", "gate_frac_below",
    ):  # fmt: skip
        out[key] = finite(summary.get(key))
    return out


# the Zoology protocol's columns: shown where a table's runs swept learning rates / stopped early
SWEEP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("best_lr", "best lr", ".1e"),
    ("lr_range", "over lrs", ".2f"),
)
SOLVED_COLUMNS: tuple[tuple[str, str, str], ...] = (("solved", "solved", ".2f"), ("steps", "steps", ".0f"))


def selection_metric(task_name: str) -> tuple[str, bool]:
    """(metric, higher is better) by which the best learning rate of a mixer is chosen on ``task_name``:
    the eval loss on text (next-byte accuracy says less), Dice on digits_seg, accuracy elsewhere."""
    return {"text": ("loss", False), "digits_seg": ("dice", True)}.get(task_name, ("accuracy", True))


def aggregate(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """task -> mixer -> metric -> {"mean", "std", "n"} over the seeds of the successful runs, at the mixer's
    best learning rate when its runs swept several (the best mean of :func:`selection_metric` over seeds;
    a run's ``task`` is its table). Then also "best_lr" (its mean is the learning rate) and "lr_range"
    ({"min", "max"} of the per-lr means of the selection metric); with early stopping "solved" (the fraction
    of seeds whose accuracy reached the threshold) and "steps" (steps trained)."""
    grouped: dict[str, dict[str, dict[float | None, list[dict]]]] = {}
    names: dict[str, str] = {}
    swept: dict[tuple, set] = {}  # (task, mixer) -> learning rates run or skipped (solved at an earlier one)
    for run in runs:
        if run.get("status") in ("ok", "skipped"):
            swept.setdefault((run["task"], run["mixer"]), set()).add(run.get("lr"))
        if run.get("status") == "ok":
            by_lr = grouped.setdefault(run["task"], {}).setdefault(run["mixer"], {})
            by_lr.setdefault(run.get("lr"), []).append(run_metrics(run))
            names[run["task"]] = run.get("task_name", run["task"])
    out: dict = {}
    for task, by_mixer in grouped.items():
        metric, higher = selection_metric(names[task])
        keys = [key for key, _, _ in columns(task) + SOLVED_COLUMNS]
        out[task] = {}
        for mixer, by_lr in by_mixer.items():
            stats = {
                lr: {key: mean_std([m[key] for m in rows]) for key in keys} for lr, rows in by_lr.items()
            }
            scores = {lr: stats[lr].get(metric, {}).get("mean") for lr in stats}

            def rank(lr, scores=scores, higher=higher):  # a learning rate without a score ranks last
                score = scores[lr]
                return (score is not None, (score if higher else -score) if score is not None else 0.0)

            best = max(stats, key=rank)
            out[task][mixer] = dict(stats[best])
            if len(swept[(task, mixer)]) > 1:
                values = [v for v in scores.values() if v is not None]
                n = stats[best].get(metric, {}).get("n", 0)
                out[task][mixer]["best_lr"] = {"mean": best, "std": None, "n": 1}
                out[task][mixer]["lr_range"] = {
                    "min": min(values, default=None), "max": max(values, default=None), "n": n,
                    "metric": metric, "by_lr": {str(lr): scores[lr] for lr in sorted(stats, key=str)},
                }  # fmt: skip
    return out


def table_rows(results: dict, task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per mixer, in the comparison's order) of the table of one task."""
    agg = results["aggregate"].get(task, {})
    moe = any(r.get("moe") for r in results["runs"] if r["task"] == task)
    routed = any(((r.get("compute") or {}).get("route")) for r in results["runs"] if r["task"] == task)
    bos = any(run_metrics(r)["bos_share"] is not None for r in results["runs"] if r["task"] == task)
    table = [
        c for c in columns(task)
        if (moe or c[0] not in MOE_COLUMNS) and (routed or c[0] != "routed") and (bos or c[0] != "bos_share")
    ]  # fmt: skip
    if any("best_lr" in stats for stats in agg.values()):
        table = list(SWEEP_COLUMNS) + table
    if any(r.get("early_stop") is not None for r in results["runs"] if r["task"] == task):
        table = list(SOLVED_COLUMNS) + table
    header = ["mixer"] + [h for _, h, _ in table]
    rows = []
    for mixer in results["config"]["mixers"]:
        failed = [
            r for r in results["runs"] if r["task"] == task and r["mixer"] == mixer and r["status"] != "ok"
        ]
        if mixer in agg:
            rows.append([mixer] + [_cell(agg[mixer].get(k), k, f) for k, _, f in table])
        elif failed:
            rows.append([mixer, f"failed: {failed[0].get('error', '')[:60]}"] + [""] * (len(table) - 1))
    return header, rows


def _cell(stats: dict | None, key: str, fmt: str) -> str:
    """A table cell: mean ± std, the best learning rate alone, or the min-max range over learning rates."""
    if key == "lr_range":
        if not stats or stats.get("min") is None:
            return "-"
        return f"{stats['min']:{fmt}}-{stats['max']:{fmt}}"
    if key == "best_lr":
        return "-" if not stats or stats.get("mean") is None else f"{stats['mean']:g}"
    return format_cell(stats, fmt)


def task_heading(results: dict, task: str) -> str:
    info = results.get("tasks", {}).get(task, {})
    uniform = [
        r["diagnostics"]["summary"].get("sink_share_uniform")
        for r in results["runs"]
        if r["task"] == task and r["status"] == "ok" and r.get("diagnostics")
    ]
    uniform = next((u for u in uniform if u is not None), None)
    bos_uniform = [
        r["diagnostics"]["summary"].get("bos_share_uniform")
        for r in results["runs"]
        if r["task"] == task and r["status"] == "ok" and r.get("diagnostics")
    ]
    bos_uniform = next((u for u in bos_uniform if u is not None), None)
    parts = [
        f"{k}={v}"
        for k, v in info.items()
        if k in ("vocab_size", "seq_len", "num_kv_pairs", "n_pairs", "n_queries", "image_size", "n_val")
    ]
    if "sha256" in info or "hash" in info:
        parts.append(f"corpus {str(info.get('sha256', info.get('hash')))[:12]}")
    text = f"{task} ({', '.join(parts)})" if parts else task
    if uniform is not None:
        text += f"; uniform first-token share {uniform:.3f}"
    if bos_uniform is not None:
        text += f", BOS share {bos_uniform:.3f}"
    return text


def sweep_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """The grid's summary: a row per mixer, a column per grid point, cells the accuracy at the best learning
    rate (mean ± std over seeds) and that learning rate when the runs swept several. None without a grid."""
    grid = results["config"].get("grid") or {}
    if not grid:
        return None
    agg = results.get("aggregate") or aggregate(results["runs"])
    labels = [t for t in results["config"]["tasks"] if t in grid]
    header = ["mixer"] + [label.partition("(")[2].rstrip(")") or label for label in labels]
    rows = []
    for mixer in results["config"]["mixers"]:
        cells = []
        for label in labels:
            stats = agg.get(label, {}).get(mixer)
            cell = format_cell((stats or {}).get("accuracy"), ".2f")
            if stats and stats.get("best_lr"):
                cell += f" @{stats['best_lr']['mean']:g}"
            cells.append(cell)
        if any(c != "-" for c in cells):
            rows.append([mixer, *cells])
    return header, rows


def print_tables(results: dict, console=None) -> None:
    """Print one rich table per task (a grid: its summary, the points' tables are in report.md)."""
    from rich.console import Console

    console = console or Console()
    if console.width < 160 and not console.is_terminal:
        console = Console(width=160)  # a log file, not a screen: do not squeeze 15 columns into 80
    grid = results["config"].get("grid") or {}
    for task in results["config"]["tasks"]:
        if task not in grid:
            console.print(rich_table(task_heading(results, task), *table_rows(results, task)))
    sweep = sweep_table(results)
    if sweep is not None:
        console.print(rich_table("accuracy at the best learning rate per grid point", *sweep))
    from .kv.rows import print_tables as print_kv_tables

    print_kv_tables(results, console)


def write_report(run_dir: str | Path, results: dict) -> dict[str, Path]:
    """Write results.json, the PNG plots and report.md into ``run_dir``; returns their paths by name."""
    from .plots import make_plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["aggregate"] = aggregate(results["runs"])
    paths = {"results": run_dir / "results.json"}
    atomic_write_json(paths["results"], to_json_safe(results))
    plots = make_plots(results, run_dir)
    paths.update(plots)
    paths["report"] = run_dir / "report.md"
    atomic_write_text(paths["report"], render_markdown(results, plots))
    return paths


DEFAULT_ARCH = {"positions": "rope", "norm": "rms", "mlp": "swiglu"}  # lm.ARCHITECTURES["llama"]


def arch_lines(results: dict, task: str) -> list[str]:
    """A line under the task's table with each mixer row's architecture (positions / norm / mlp, the run
    entries' "arch"), only when some run on ``task`` differs from the default; else none."""
    archs = {r["mixer"]: r["arch"] for r in results["runs"] if r["task"] == task and r.get("arch")}
    if all(a == DEFAULT_ARCH for a in archs.values()):
        return []
    shown = "; ".join(f"`{m}`: {a['positions']}/{a['norm']}/{a['mlp']}" for m, a in archs.items())
    return [f"Architecture (positions/norm/mlp): {shown}", ""]


def render_markdown(results: dict, plots: dict[str, Path]) -> str:
    config, env = results["config"], results["environment"]
    seeds = config["seeds"]
    lines = [
        f"# gatelab compare: {results.get('name', '')}",
        "",
        f"Preset `{config['preset']}`: {config.get('description', '')}.",
        "",
        f"- every mixer gets the same budget on a task (sizes and steps under each task's heading); "
        f"seeds {', '.join(map(str, seeds))} (mean ± sample std over seeds when more than one)",
        f"- machine: {env.get('machine', '')}; device {env.get('device', '')}; torch {env.get('torch', '')}; "
        f"{env.get('threads', '')} threads",
        f"- wall time: {results.get('wall_s', 0):.0f} s; command: `{results.get('command', '')}`",
        "",
    ]
    variants = {n: v for n, v in (config.get("variants") or {}).items() if v["options"] or n != v["key"]}
    if variants:  # what each named variant is (a bare key is its own description)
        lm = ("mlp", "positions", "norm")  # the LM's options a variant may set beside its mixer's
        lines += ["Variants: " + "; ".join(
            f"`{n}` = `{v['key']}` with " + (", ".join(f"{k}={json.dumps(o)}" for k, o in
                                                       [*v["options"].items(), *((k, v[k]) for k in lm if k in v)])
                                              or "its defaults")
            for n, v in variants.items()), ""]  # fmt: skip
    skipped = results.get("skipped_mixers") or {}
    if skipped:
        lines += ["Not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()), ""]
    sweep = sweep_table(results)
    if sweep is not None:
        lines += ["## Accuracy at the best learning rate per grid point", "", markdown_table(*sweep), ""]
    for task in config["tasks"]:
        header, rows = table_rows(results, task)
        lines += [f"## {task_heading(results, task)}", ""]
        budget = (config.get("task_config") or {}).get(task)
        if budget:
            lr = (
                f"lrs {', '.join(f'{v:g}' for v in budget['lrs'])}"
                if budget.get("lrs")
                else f"lr {budget['lr']}"
            )
            stop = (
                f"; stop at accuracy {budget['early_stop']}" if budget.get("early_stop") is not None else ""
            )
            lines += [
                f"{budget['n_layers']} layers, d_model {budget['d_model']}, {budget['n_heads']} heads; "
                f"{budget['steps']} steps of batch {budget['batch_size']}, {lr}{stop}",
                "",
            ]
        lines += [markdown_table(header, rows), ""]
        lines += arch_lines(results, task)
    lines += ["Columns: " + COLUMN_NOTES + " " + SWEEP_NOTES, ""]
    from .kv.rows import markdown_section

    lines += markdown_section(results)  # only when the run was asked for --kv-cache
    titles = {
        "loss_curves": "Training loss",
        "mqar_accuracy": "MQAR accuracy",
        "sink_share": "First-token attention share per layer",
        "bos_share": "BOS attention share per layer",
        "max_activation": "Max absolute activation of the residual stream per layer",
        "speed": "Training speed",
        "sweep": "Accuracy against d_model at the best learning rate (Zoology, Figure 2)",
    }
    for name, path in plots.items():
        lines += [f"## {titles.get(name, name)}", "", f"![{name}]({Path(path).name})", ""]
    return "\n".join(lines)


def _load_results(run_dir: str | Path) -> dict:
    """The results.json of a comparison; a clear error names the file when it is missing or not one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {run_dir}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); is it torn or edited?") from None
    config = results.get("config") if isinstance(results, dict) else None
    problem = None
    if not isinstance(config, dict):
        problem = "no 'config' object"
    elif not isinstance(config.get("preset"), str) or not isinstance(config.get("tasks"), list):
        problem = "its config has no 'preset' or 'tasks'"
    elif not isinstance(config.get("seeds"), list) or not isinstance(results.get("runs"), list):
        problem = "no 'seeds' in its config or no 'runs' list"
    elif not all(
        isinstance(r, dict) and {"mixer", "task", "seed", "status"} <= set(r) for r in results["runs"]
    ):
        problem = "a run without mixer, task, seed and status"
    if problem:
        raise ValueError(f"{path}: not a gatelab compare results.json ({problem})")
    return results


def _agreeing(loaded: list[dict], paths: list, key: str) -> dict:
    """The union of config[key] (name -> description) over the runs; a name described differently by two
    runs is an error naming both folders (their runs could not share one table)."""
    out, source = {}, {}
    for results, path in zip(loaded, paths):
        for name, value in (results["config"].get(key) or {}).items():
            if name in out and out[name] != value:
                raise ValueError(
                    f"{source[name]} and {path} disagree on {key}[{name!r}] ({out[name]} vs {value}); "
                    "merge runs of one configuration"
                )
            out.setdefault(name, value)
            source.setdefault(name, path)
    return out


def merge_results(
    run_dirs: Sequence[str | Path], out_dir: str | Path, name: str | None = None, *, overwrite: bool = False
) -> dict:
    """Merge the results.json of comparisons run as separate processes (e.g. one per task or per seed, in
    parallel) into one report in ``out_dir``, a new folder: never one of the inputs, and one holding an
    earlier results.json only with ``overwrite``. The runs must share a preset and agree on each task's
    budget and each variant's options; their runs are concatenated with duplicates (the same mixer, task,
    seed and spec, e.g. a folder given twice) kept once, tasks and seeds united, and the report says which
    commands made it. Returns the merged results."""
    from .rundir import locked, refuse_existing

    if not run_dirs:
        raise ValueError("give at least one run folder to merge")
    out = Path(out_dir).resolve()
    for run_dir in run_dirs:
        if Path(run_dir).resolve() == out:
            raise ValueError(
                f"--out {out_dir} is one of the run folders to merge; write the merge to a new folder"
            )
    loaded = [_load_results(d) for d in run_dirs]
    presets = {r["config"]["preset"] for r in loaded}
    if len(presets) != 1:
        raise ValueError(f"can only merge runs of one preset, got {sorted(presets)}")
    first = loaded[0]
    config = dict(first["config"])
    config["tasks"] = list(dict.fromkeys(t for r in loaded for t in r["config"]["tasks"]))
    config["seeds"] = sorted({s for r in loaded for s in r["config"]["seeds"]})
    for key in ("task_config", "variants"):
        config[key] = _agreeing(loaded, list(run_dirs), key)
    config["task_names"] = list(dict.fromkeys(t for r in loaded for t in r["config"].get("task_names", [])))
    config["grid"] = {k: v for r in loaded for k, v in (r["config"].get("grid") or {}).items()}
    config["shard"] = None
    config["task_mixers"] = {
        t: list(dict.fromkeys(m for r in loaded for m in (r["config"].get("task_mixers") or {}).get(t, [])))
        for t in config["tasks"]
    }
    config["mixers"] = list(dict.fromkeys(m for r in loaded for m in r["config"].get("mixers", [])))
    runs: dict[tuple, dict] = {}
    for results, run_dir in zip(loaded, run_dirs):
        for run in results["runs"]:
            if run.get("model_dir"):  # relative to the merged folder, so inspect finds the model
                run = {**run, "model_dir": os.path.relpath(Path(run_dir) / run["model_dir"], out)}
            spec = json.dumps([config["task_config"].get(run["task"]), config["variants"].get(run["mixer"])])
            key = (run["mixer"], run["task"], run["seed"], run.get("lr"), spec)
            if key not in runs or (runs[key]["status"] != "ok" and run["status"] == "ok"):
                runs[key] = run  # one run per key; a successful rerun replaces a failed one
    merged = {
        "name": name or Path(out_dir).name,
        "created": first.get("created"),
        "command": " ; ".join(r.get("command", "") for r in loaded) + " (run in parallel, merged)",
        "config": config,
        "environment": first["environment"],
        "tasks": {k: v for r in loaded for k, v in (r.get("tasks") or {}).items()},
        "skipped_mixers": {k: v for r in loaded for k, v in (r.get("skipped_mixers") or {}).items()},
        "runs": list(runs.values()),
        "wall_s": max(r.get("wall_s", 0) for r in loaded),
        "merged_from": [{"dir": str(d), "wall_s": r.get("wall_s")} for d, r in zip(run_dirs, loaded)],
        "duplicate_runs": sum(len(r["runs"]) for r in loaded) - len(runs),
    }
    with locked(out_dir):
        refuse_existing(out_dir, ("results.json",), overwrite=overwrite)
        write_report(out_dir, merged)
    merged["aggregate"] = aggregate(merged["runs"])
    return merged


merge = merge_results  # gatelab.lab.merge
