"""The report of ``gatelab cache``: report.md (one table per task) and the quality-vs-memory plot."""

from __future__ import annotations

from pathlib import Path

from gatelab.lab.tables import format_cell


def _pm(row: dict, key: str, digits: int) -> str:
    """``row[key]``, with `` ± row[key_std]`` when the row averages several seeds (see aggregate_rows)."""
    stats = {"mean": row[key], "std": row.get(f"{key}_std"), "n": row.get("seeds", 1)}
    return format_cell(stats, f".{digits}f")


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "accuracy" if task == "mqar" else "loss"
        rows = results["tasks"][task]["rows"]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            points = sorted(
                (r["kept_bytes_fraction"], r[metric], r.get(f"{metric}_std", 0.0))
                for r in rows
                if r["policy"] == policy
            )
            style = (
                {"linestyle": "--", "marker": "*", "markersize": 12} if policy == "full" else {"marker": "o"}
            )
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        label=policy, capsize=3, **style)  # fmt: skip
        ax.set_xlabel("bytes of kept keys/values + gate state / full cache")
        ax.set_ylabel(f"{metric} ({'higher' if metric == 'accuracy' else 'lower'} is better)")
        entry = results["tasks"][task]
        seeds = len(entry.get("seeds", [0]))
        ax.set_title(f"{task}: T={entry['eval']['seq_len']} (trained at {entry['train']['seq_len']})"
                     + (f", mean ± std of {seeds} seeds" if seeds > 1 else ""), fontsize=10)  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    lines = [
        f"# gatelab cache: {results['name']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['environment']['machine']}; torch {results['environment']['torch']}  ",
        f"Wall time: {results['wall_s']:.0f} s",
        "",
        "Each row decodes the evaluation sequences token by token (teacher forcing) under the policy. "
        "kept: tokens held / tokens seen at the end, mean over layers; kept+gate: bytes of the kept keys "
        "and values plus the attention gate's own state / bytes of the full cache (what a cache without "
        "padding holds; the plot's x axis); held: bytes this implementation allocates / bytes of the full "
        "cache (its cache is rectangular, padded to the row and head that keep most: attention-gate rows "
        "keep different numbers of tokens); bytes/layer: keys and values allocated per layer at the end "
        "(all sequences); peak: most bytes held over all layers at any step, gate states included.",
        "",
        "Protocol: a softmax LM is trained at the training length; the attention-gate rows fine-tune it with "
        "gates (gate_steps, target keep = budget); every other row runs on the same LM fine-tuned the same "
        "steps, batches and learning rate without gates (the control), so all rows see equally many updates.",
        "",
        "![quality vs memory](quality_vs_memory.png)",
    ]
    for task, entry in results["tasks"].items():
        lines += [
            "",
            f"## {task} (trained at T={entry['train']['seq_len']}, evaluated at T={entry['eval']['seq_len']})",
            "",
            f"Base LM before the control fine-tune, full cache: loss {entry['base_full']['loss']:.4f}, "
            f"accuracy {entry['base_full']['accuracy']:.3f}.",
            "",
            "| policy | budget | kept | kept+gate | held | loss | accuracy | bytes/layer | peak cache bytes "
            "| decode tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in entry["rows"]:
            per_layer = "/".join(f"{round(b):,}" for b in r["bytes_per_layer"])
            lines.append(
                f"| {r['policy']} | {r['budget']:.2f} | {r['kept_fraction']:.3f} | "
                f"{r['kept_bytes_fraction']:.3f} | {r['held_fraction']:.3f} | "
                f"{_pm(r, 'loss', 4)} | "
                f"{_pm(r, 'accuracy', 3)} | {per_layer} | {round(r['peak_cache_bytes']):,} | {r['tokens_per_s']:,.0f} |"
            )
    return "\n".join(lines) + "\n"
