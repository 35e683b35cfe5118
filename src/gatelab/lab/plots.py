"""PNG plots of a ``gatelab compare`` run (matplotlib, Agg backend): loss curves, MQAR accuracy, sink
share and max activation per layer, training speed, quality against FLOPs per token per task."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .presets import SHORT  # noqa: E402


def _ok_runs(results: dict, task: str | None = None) -> list[dict]:
    """The successful runs (of the table ``task``), at each mixer's best learning rate where they swept."""
    agg = results.get("aggregate") or {}

    def at_best(run: dict) -> bool:
        best = (agg.get(run["task"], {}).get(run["mixer"]) or {}).get("best_lr")
        return best is None or run.get("lr") == best["mean"]

    return [
        r
        for r in results["runs"]
        if r["status"] == "ok" and (task is None or r["task"] == task) and at_best(r)
    ]


def _tables(results: dict) -> list[str]:
    """The tables the per-table plots draw: every table but the points of a grid (their plot is the sweep)."""
    grid = results["config"].get("grid") or {}
    return [t for t in results["config"]["tasks"] if t not in grid]


def _colors(mixers: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20" if len(mixers) > 10 else "tab10")
    return {m: cmap(i % cmap.N) for i, m in enumerate(mixers)}


def _mean_curve(runs: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``key`` in the history rows of ``split``, at the steps every seed logged."""
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.get("history", []):
            if row.get("split") == split and row.get(key) is not None:
                per_step.setdefault(row["step"], []).append(float(row[key]))
    steps = sorted(s for s, v in per_step.items() if len(v) == len(runs))
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _grid(n: int, width: float = 5.0, height: float = 3.6):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _legend(axes) -> None:
    """One legend for every mixer drawn on any of ``axes`` (an Axes or a sequence), outside the last one:
    with a dozen mixers it would hide the curves, and a task may not show every mixer."""
    axes = list(axes) if isinstance(axes, list | tuple) or hasattr(axes, "__array__") else [axes]
    labels: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    if labels:
        axes[-1].legend(
            list(labels.values()), list(labels), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
        )  # fmt: skip


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(results: dict, path: Path) -> Path:
    tasks, mixers = _tables(results), results["config"]["mixers"]
    colors = _colors(mixers)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for mixer in mixers:
            runs = [r for r in _ok_runs(results, task) if r["mixer"] == mixer]
            if runs:
                steps, loss = _mean_curve(runs, "train", "loss")
                ax.plot(
                    steps, _smooth(loss, max(1, len(loss) // 30)), label=mixer, color=colors[mixer], lw=1.2
                )
        ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss (smoothed)")
        ax.grid(alpha=0.3)
    _legend(axes)
    return _save(fig, path)


def plot_mqar_accuracy(results: dict, path: Path) -> Path:
    mixers = results["config"]["mixers"]
    colors = _colors(mixers)
    fig, axes = _grid(1, width=6.5)
    ax = axes[0]
    for mixer in mixers:
        runs = [r for r in _ok_runs(results, "mqar") if r["mixer"] == mixer]
        if runs:
            steps, acc = _mean_curve(runs, "val", "accuracy")
            ax.plot(steps, acc, marker="o", ms=3, label=mixer, color=colors[mixer])
    ax.set(title="MQAR: accuracy at query positions", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _plot_per_layer(
    results: dict, path: Path, key: str, title: str, ylabel: str, log: bool, baseline: str | None,
    tasks: list[str] | None = None,
):  # fmt: skip
    tasks = _tables(results) if tasks is None else tasks
    mixers = results["config"]["mixers"]
    colors = _colors(mixers)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        base = None
        for mixer in mixers:
            runs = [r for r in _ok_runs(results, task) if r["mixer"] == mixer]
            curves = [r["diagnostics"].get(key) for r in runs if r.get("diagnostics")]
            if key == "max_activation":
                curves = [c[1:] for c in curves]  # h_1..h_L: after each block
            if not curves or any(c is None or any(v is None for v in c) for c in curves):
                continue  # a layer without attention internals: nothing to draw
            mean = [sum(vals) / len(vals) for vals in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=mixer, color=colors[mixer])
            if baseline and runs:
                base = runs[0]["diagnostics"].get(baseline)
        if base is not None:
            ax.axhline(base, color="gray", ls="--", lw=1, label="uniform attention")
        ax.set(title=f"{task}: {title}", xlabel="layer", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _legend(axes)
    return _save(fig, path)


def plot_speed(results: dict, path: Path) -> Path:
    tasks, mixers = _tables(results), results["config"]["mixers"]
    fig, axes = _grid(1, width=max(6.0, 0.6 * len(mixers) * len(tasks) / 2 + 3))
    ax = axes[0]
    width = 0.8 / max(1, len(tasks))
    for j, task in enumerate(tasks):
        values = []
        for mixer in mixers:
            speeds = [r["tokens_per_s"] for r in _ok_runs(results, task) if r["mixer"] == mixer]
            values.append(sum(speeds) / len(speeds) if speeds else 0.0)
        ax.bar([i + j * width for i in range(len(mixers))], values, width=width, label=task)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(mixers))], mixers, rotation=45, ha="right", fontsize=8
    )
    ax.set(title="training speed", ylabel="tokens / s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_quality_vs_compute(results: dict, task: str, path: Path) -> Path | None:
    """Quality (accuracy where the task has it, else eval loss) against forward FLOPs per token at the
    task's length: one point per mixer (mean over seeds, bars: the seeds' range); None without counts."""
    mixers = results["config"]["mixers"]
    colors = _colors(mixers)
    points = []
    for mixer in mixers:
        runs = [r for r in _ok_runs(results, task) if r["mixer"] == mixer]
        flops = [(r.get("compute") or {}).get("flops_per_token") for r in runs]
        if not runs or any(f is None for f in flops):
            continue
        metric = "accuracy" if all("accuracy" in r["final"] for r in runs) else "loss"
        values = [float(r["final"][metric]) for r in runs]
        points.append((mixer, sum(flops) / len(flops), values, metric))
    if not points:
        return None
    fig, axes = _grid(1, width=6.5)
    ax = axes[0]
    for mixer, flops, values, _metric in points:
        mean = sum(values) / len(values)
        ax.errorbar([flops], [mean], yerr=[[mean - min(values)], [max(values) - mean]], marker="o", capsize=3,
                    label=mixer, color=colors[mixer])  # fmt: skip
    metrics = {p[3] for p in points}
    ax.set(
        title=f"{task}: quality vs compute",
        xlabel="forward FLOPs / token",
        ylabel=" / ".join(sorted(metrics)),
    )
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_sweep(results: dict, path: Path) -> Path | None:
    """Zoology's Figure 2: the best accuracy over learning rates (mean over seeds) against d_model, one
    panel per grid point without its d_model (e.g. MQAR at one (T, kv pairs)), a line per mixer. None when
    no grid has a d_model axis."""
    grid = results["config"].get("grid") or {}
    agg = results.get("aggregate") or {}
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label, point in grid.items():
        if "d_model" not in point:
            continue
        rest = {k: v for k, v in point.items() if k not in ("task", "d_model")}
        name = point["task"] + " " + " ".join(f"{SHORT.get(k, k)}={v}" for k, v in rest.items())
        for mixer, stats in agg.get(label, {}).items():
            value = (stats.get("accuracy") or {}).get("mean")
            if value is not None:
                panels.setdefault(name, {}).setdefault(mixer, []).append((point["d_model"], value))
    if not panels:
        return None
    mixers = results["config"]["mixers"]
    colors = _colors(mixers)
    fig, axes = _grid(len(panels), width=4.2, height=3.6)
    for ax, (name, lines) in zip(axes, panels.items()):
        for mixer in mixers:
            if mixer in lines:
                xs, ys = zip(*sorted(lines[mixer]))
                ax.plot(xs, ys, marker="o", ms=3, label=mixer, color=colors[mixer])
        ax.set(title=name, xlabel="d_model", ylabel="accuracy (best lr)", ylim=(-0.02, 1.02), xscale="log")
        ax.set_xticks(sorted({x for line in lines.values() for x, _ in line}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    _legend(axes)
    return _save(fig, path)


def make_plots(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write the PNGs into ``out_dir``; returns name -> path (MQAR accuracy only when mqar was run, the
    sweep only for a grid with a d_model axis)."""
    out_dir = Path(out_dir)
    if not _ok_runs(results):
        return {}
    plots = {}
    sweep = plot_sweep(results, out_dir / "sweep.png")
    if sweep is not None:
        plots["sweep"] = sweep
    if not _tables(results):
        return plots
    plots["loss_curves"] = plot_loss_curves(results, out_dir / "loss_curves.png")
    if _ok_runs(results, "mqar"):
        plots["mqar_accuracy"] = plot_mqar_accuracy(results, out_dir / "mqar_accuracy.png")
    plots["sink_share"] = _plot_per_layer(
        results, out_dir / "sink_share.png", "sink_share_layer", "first-token attention share", "share", False,
        "sink_share_uniform",
    )  # fmt: skip
    with_bos = [
        task for task in _tables(results)
        if any(v is not None for r in _ok_runs(results, task)
               for v in (r.get("diagnostics") or {}).get("bos_share_layer") or [])
    ]  # fmt: skip
    if with_bos:  # the share on every key holding BOS (position 0 and document starts), tasks with BOS only
        plots["bos_share"] = _plot_per_layer(
            results, out_dir / "bos_share.png", "bos_share_layer", "BOS attention share", "share", False,
            "bos_share_uniform", with_bos,
        )  # fmt: skip
    plots["max_activation"] = _plot_per_layer(
        results, out_dir / "max_activation.png", "max_activation", "max |h| after each block", "max |h|", True,
        None,
    )  # fmt: skip
    plots["speed"] = plot_speed(results, out_dir / "speed.png")
    for task in _tables(results):
        path = plot_quality_vs_compute(results, task, out_dir / f"quality_vs_compute_{task}.png")
        if path is not None:
            plots[f"quality_vs_compute_{task}"] = path
    return plots


def plot_layer_head_heatmap(matrix: list[list[float] | None], path: Path, title: str, label: str) -> Path:
    """A layer x head heat map (rows = layers from 1, columns = heads from 0); a layer without values
    (None: no attention matrix) is left blank. Written atomically (a reader never sees half a PNG)."""
    import io

    import numpy as np

    from gatelab.lab.rundir import atomic_write_bytes

    width = max((len(row) for row in matrix if row is not None), default=0)
    if width == 0:
        raise ValueError(f"{title}: no layer has per-head values to draw")
    grid = np.full((len(matrix), width), np.nan)
    for i, row in enumerate(matrix):
        if row is not None:
            grid[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * width, 1.0 + 0.4 * len(matrix)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(1e-9, float(np.nanmax(grid))))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(width), yticks=range(len(matrix)))
    ax.set_yticklabels([str(i + 1) for i in range(len(matrix))])
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
