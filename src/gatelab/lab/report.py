"""The report of ``gatelab compare``: results.json, PNG plots (matplotlib, Agg) and report.md with the
table and the plots embedded; also the rich table printed on the terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .rundir import atomic_write_json, atomic_write_text
from .tables import finite, format_cell, markdown_table, mean_std, rich_table, to_json_safe

# (key, header, format): one column of the comparison table, read from run_metrics(run)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "eval loss", ".3f"),
    ("accuracy", "accuracy", ".3f"),
    ("sink_share", "sink share", ".3f"),
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
    "give the baseline in the task's heading); attn entropy: mean over attention layers (nats); "
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
MOE_COLUMNS = ("expert_load", "active_experts", "moe_aux")  # shown only where some run has an MoE MLP


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
    for key in (
        "sink_share", "attn_entropy", "max_activation", "massive_ratio", "max_inf_norm", "avg_kurtosis",
        "w8a8_gap", "gate_mean", "gate_frac_below",
    ):  # fmt: skip
        out[key] = finite(summary.get(key))
    return out


def aggregate(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """task -> mixer -> metric -> {"mean", "std", "n"} over the seeds of the successful runs."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        if run.get("status") == "ok":
            grouped.setdefault(run["task"], {}).setdefault(run["mixer"], []).append(run_metrics(run))
    return {
        task: {
            mixer: {key: mean_std([m[key] for m in metrics]) for key, _, _ in columns(task)}
            for mixer, metrics in by_mixer.items()
        }
        for task, by_mixer in grouped.items()
    }


def table_rows(results: dict, task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per mixer, in the comparison's order) of the table of one task."""
    agg = results["aggregate"].get(task, {})
    moe = any(r.get("moe") for r in results["runs"] if r["task"] == task)
    routed = any(((r.get("compute") or {}).get("route")) for r in results["runs"] if r["task"] == task)
    table = [c for c in columns(task) if (moe or c[0] not in MOE_COLUMNS) and (routed or c[0] != "routed")]
    header = ["mixer"] + [h for _, h, _ in table]
    rows = []
    for mixer in results["config"]["mixers"]:
        failed = [
            r for r in results["runs"] if r["task"] == task and r["mixer"] == mixer and r["status"] != "ok"
        ]
        if mixer in agg:
            rows.append([mixer] + [format_cell(agg[mixer].get(k), f) for k, _, f in table])
        elif failed:
            rows.append([mixer, f"failed: {failed[0].get('error', '')[:60]}"] + [""] * (len(table) - 1))
    return header, rows


def task_heading(results: dict, task: str) -> str:
    info = results.get("tasks", {}).get(task, {})
    uniform = [
        r["diagnostics"]["summary"].get("sink_share_uniform")
        for r in results["runs"]
        if r["task"] == task and r["status"] == "ok" and r.get("diagnostics")
    ]
    uniform = next((u for u in uniform if u is not None), None)
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
    return text


def print_tables(results: dict, console=None) -> None:
    """Print one rich table per task."""
    from rich.console import Console

    console = console or Console()
    if console.width < 160 and not console.is_terminal:
        console = Console(width=160)  # a log file, not a screen: do not squeeze 15 columns into 80
    for task in results["config"]["tasks"]:
        console.print(rich_table(task_heading(results, task), *table_rows(results, task)))
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
        lines += ["Variants: " + "; ".join(
            f"`{n}` = `{v['key']}` with " + (", ".join(f"{k}={json.dumps(o)}" for k, o in v["options"].items())
                                              or "its defaults")
            for n, v in variants.items()), ""]  # fmt: skip
    skipped = results.get("skipped_mixers") or {}
    if skipped:
        lines += ["Not run: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()), ""]
    for task in config["tasks"]:
        header, rows = table_rows(results, task)
        lines += [f"## {task_heading(results, task)}", ""]
        budget = (config.get("task_config") or {}).get(task)
        if budget:
            lines += [
                f"{budget['n_layers']} layers, d_model {budget['d_model']}, {budget['n_heads']} heads; "
                f"{budget['steps']} steps of batch {budget['batch_size']}, lr {budget['lr']}",
                "",
            ]
        lines += [markdown_table(header, rows), ""]
        lines += arch_lines(results, task)
    lines += ["Columns: " + COLUMN_NOTES, ""]
    from .kv.rows import markdown_section

    lines += markdown_section(results)  # only when the run was asked for --kv-cache
    titles = {
        "loss_curves": "Training loss",
        "mqar_accuracy": "MQAR accuracy",
        "sink_share": "First-token attention share per layer",
        "max_activation": "Max absolute activation of the residual stream per layer",
        "speed": "Training speed",
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
    config["task_mixers"] = {
        t: list(dict.fromkeys(m for r in loaded for m in (r["config"].get("task_mixers") or {}).get(t, [])))
        for t in config["tasks"]
    }
    config["mixers"] = list(dict.fromkeys(m for r in loaded for m in r["config"].get("mixers", [])))
    runs: dict[tuple, dict] = {}
    for results in loaded:
        for run in results["runs"]:
            spec = json.dumps([config["task_config"].get(run["task"]), config["variants"].get(run["mixer"])])
            key = (run["mixer"], run["task"], run["seed"], spec)
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
