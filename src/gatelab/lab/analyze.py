"""gatelab.lab.analyze: the head and circuit report of a saved gatelab LM (or a run folder of them) on the
validation batches of its task: per-head ablation, interchange, direct logit attribution, gate heads, gate
values, attention distances, sinks, WAAD / FAI and AttentionInfluence (gatelab.analysis), as tables
(report.md, results.json) and layer x head heat maps (heads.png)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gatelab.analysis import (
    ModelLayers,
    Site,
    ablation_scores,
    activation_patching,
    attention_influence,
    capture,
    direct_logit_attribution,
    fai,
    find_gate_heads,
    gate_values,
    head_groups,
    mean_backward_distance,
    plain_softmax,
    waad,
)
from gatelab.lab.rundir import atomic_write_json, atomic_write_text, locked, refuse_existing
from gatelab.lab.tables import markdown_table, to_json_safe
from gatelab.lab.tasks._base import IGNORE

REPORT_FILES = ("report.md", "results.json", "heads.png", "attention.png")


def _loss(targets):
    return lambda out: F.cross_entropy(out[0].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def _accuracy(targets):
    labelled = targets != IGNORE
    return lambda out: (out[0].argmax(-1) == targets)[labelled].float().mean()


def _target_logprob(targets):
    """Mean log-probability of the clean targets at the clean labelled positions (the interchange metric)."""
    labelled = targets != IGNORE

    def metric(out):
        logp = out[0].float().log_softmax(-1)
        return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][labelled].mean()

    return metric


def _dla_inputs(model, inputs, targets):
    """Rows with a label, each row's last labelled position, its target and the model's best other token."""
    labelled = targets != IGNORE
    rows = labelled.any(1)
    inputs, targets, labelled = inputs[rows], targets[rows], labelled[rows]
    T = targets.shape[1]
    position = (labelled * torch.arange(1, T + 1)).argmax(1)  # the last labelled position of each row
    target = targets[torch.arange(len(targets)), position]
    with torch.no_grad():
        logits = model(inputs)[0][torch.arange(len(targets)), position].float()
    other = logits.scatter(1, target[:, None], float("-inf")).argmax(1)
    return inputs, target, other, position


def _attention(model, inputs, n_layers: int, n_heads: int) -> dict:
    """Mean backward distance and first-token mass per head, WAAD / FAI per position (Attention Illuminates
    LLM Reasoning: local / global heads = bottom / top 30% by distance over every head with a map)."""
    nan = torch.full((n_layers, n_heads), float("nan"))
    distance, sink, maps = nan.clone(), nan.clone(), {}
    for i in range(n_layers):
        try:
            _, cache = capture(model, lambda: model(inputs), [Site("attn", i)])
        except TypeError:  # a mixer with no attention map
            continue
        attn = cache[Site("attn", i)].float()  # (B, H, T, S)
        if attn.ndim != 4 or attn.shape[1] != n_heads:
            continue
        maps[i] = attn
        distance[i] = mean_backward_distance(attn)
        sink[i] = attn[..., 0].mean(dim=(0, 2))
    result = {"distance": distance, "sink": sink, "waad": None, "fai": None}
    if maps:
        pairs = [(i, h) for i in maps for h in range(n_heads)]
        flat = torch.stack([distance[i, h] for i, h in pairs])
        local, far = head_groups(flat)

        def mean_map(group: list[int]) -> torch.Tensor:  # (B, T, S): the mean map of a group of heads
            return torch.stack([maps[pairs[g][0]][:, pairs[g][1]] for g in group]).mean(0)

        T = inputs.shape[1]
        result["waad"] = waad(mean_map(local.tolist())).mean(0)  # (T,)
        result["fai"] = fai(mean_map(far.tolist()), low=min(10, T - 1), high=100).nanmean(0)
        result["local_heads"] = [pairs[g] for g in local.tolist()]
        result["global_heads"] = [pairs[g] for g in far.tolist()]
    return result


@torch.no_grad()
def analyze_lm(model, inputs: torch.Tensor, targets: torch.Tensor, corrupt: torch.Tensor) -> dict:
    """The head report of a gatelab LM (or a transformers causal LM patched by gatelab.hf) on labelled
    batches: inputs / targets (B, T) (IGNORE: no label) and
    ``corrupt`` (B, T), other prompts of the task (the interchange's corrupted run and the mean-ablation
    reference). Every (L, H) entry is a tensor; see the module docstring."""
    model.eval()
    layers = ModelLayers(model)
    L, H = len(layers), max(layers.n_heads)
    run = lambda: model(inputs)  # noqa: E731
    base = {"loss": float(_loss(targets)(run())), "accuracy": float(_accuracy(targets)(run()))}
    result = {"base": base}
    result["zero_loss"] = ablation_scores(model, run, _loss(targets))["scores"]
    result["zero_accuracy"] = ablation_scores(model, run, _accuracy(targets))["scores"]
    result["mean_loss"] = ablation_scores(model, run, _loss(targets), "mean", lambda: model(corrupt))[
        "scores"
    ]
    patched = activation_patching(model, run, lambda: model(corrupt), _target_logprob(targets), per="head")
    result["interchange"] = patched["patched"] - patched["corrupt"]
    result["interchange_normalized"] = patched["normalized"]
    idx, target, other, position = _dla_inputs(model, inputs, targets)
    dla = direct_logit_attribution(model, idx, target, other, position)
    result["dla"] = dla["heads"].mean(0)
    result["logit_difference"] = float(dla["total"].mean())
    # gate heads: how large is a head's interchange effect on the clean target's logit difference
    patched_diff = activation_patching(
        model,
        lambda: model(idx),
        lambda: model(corrupt[: len(idx)]),
        _logit_difference(target, other, position),
    )
    result["interchange_logit_difference"] = patched_diff["patched"] - patched_diff["corrupt"]
    result["gate_heads"] = find_gate_heads(
        result["interchange_logit_difference"], result["dla"], result["logit_difference"]
    )
    result["gate_values"] = gate_values(model, run)
    result["attention"] = _attention(model, inputs, L, H)
    top = _top_heads(result["zero_loss"], share=0.05)
    if all(plain_softmax(layers.mixers[i]) for i, _ in top):
        heads = {}
        for i, h in top:
            heads.setdefault(i, []).append(h)
        scores = attention_influence(model, inputs, targets, heads)
        result["attention_influence"] = {
            "heads": top,
            "mean": float(scores.mean()),
            "max": float(scores.max()),
        }
    return result


def _logit_difference(target, other, position):
    rows = torch.arange(len(target))

    def metric(out):
        logits = out[0][rows, position].float()
        return (logits[rows, target] - logits[rows, other]).mean()

    return metric


def _top_heads(scores: torch.Tensor, share: float) -> list[tuple[int, int]]:
    flat = scores.nan_to_num(float("-inf")).flatten()
    k = max(1, round(share * flat.numel()))
    return [divmod(int(j), scores.shape[1]) for j in flat.topk(k).indices]


# Report ----------------------------------------------------------------------------------------------------

HEAT_MAPS = (
    ("zero_accuracy", "zero ablation: accuracy change"),
    ("zero_loss", "zero ablation: loss change"),
    ("mean_loss", "mean ablation: loss change"),
    ("interchange_normalized", "interchange (clean -> corrupt), normalised"),
    ("dla", "direct logit attribution"),
    ("interchange_logit_difference", "interchange effect on the logit difference"),
)


def _head_table(values: torch.Tensor, fmt: str = "+.3f") -> str:
    header = ["layer"] + [f"h{h}" for h in range(values.shape[1])]
    rows = [
        [str(i)] + ["-" if v != v else format(float(v), fmt) for v in values[i]] for i in range(len(values))
    ]
    return markdown_table(header, rows)


def _maps(result: dict) -> list[tuple[str, torch.Tensor]]:
    maps = [(title, result[key]) for key, title in HEAT_MAPS]
    maps += [
        ("mean backward distance", result["attention"]["distance"]),
        ("attention on the first token", result["attention"]["sink"]),
    ]
    if not torch.isnan(result["gate_values"]).all():
        maps.append(("mean gate value", result["gate_values"]))
    return maps


def plot_heads(result: dict, path: Path) -> Path:
    """One layer x head heat map per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = _maps(result)
    cols = 3
    fig, axes = plt.subplots(
        -(-len(maps) // cols), cols, figsize=(4.2 * cols, 3.0 * -(-len(maps) // cols)), squeeze=False
    )
    for ax, (title, values) in zip(axes.flat, maps):
        signed = bool((values.nan_to_num(0) < 0).any())
        bound = float(values.nan_to_num(0).abs().max()) or 1.0  # signed maps: 0 is the middle colour
        shown = ax.imshow(
            values.numpy(),
            cmap="coolwarm" if signed else "viridis",
            aspect="auto",
            vmin=-bound if signed else None,
            vmax=bound if signed else None,
        )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        fig.colorbar(shown, ax=ax)
    for ax in list(axes.flat)[len(maps) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_attention(result: dict, path: Path) -> Path | None:
    attention = result["attention"]
    if attention["waad"] is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].plot(attention["waad"].numpy())
    axes[0].set_title("WAAD per position (local heads, W=10)", fontsize=8)
    axes[1].plot(attention["fai"].numpy())
    axes[1].set_title("FAI per position (global heads)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("position", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_markdown(name: str, result: dict, seconds: float) -> str:
    base = result["base"]
    lines = [
        f"# Head analysis: {name}",
        "",
        f"Base loss {base['loss']:.4f}, accuracy {base['accuracy']:.4f}; mean logit difference "
        "(target vs the "
        f"best other token at each row's last labelled position) {result['logit_difference']:.3f}. "
        f"Analysis took {seconds:.1f} s.",
        "",
        "![heads](heads.png)",
        "",
    ]
    for title, values in _maps(result):
        lines += [f"## {title}", "", _head_table(values), ""]
    gate = result["gate_heads"]
    lines += ["## Gate heads (large interchange effect, small DLA)", ""]
    lines += [
        f"- layer {g['layer']} head {g['head']}: effect {g['effect']:+.3f}, DLA {g['dla']:+.3f}" for g in gate
    ]
    lines += ["- none" if not gate else "", ""]
    attention = result["attention"]
    if attention["waad"] is not None:
        lines += [
            "## WAAD / FAI",
            "",
            f"local heads {attention['local_heads']}, global heads "
            f"{attention['global_heads']}; mean WAAD {float(attention['waad'].mean()):.3f}, mean FAI "
            f"{float(attention['fai'].nanmean()):.4f}",
            "",
            "![attention](attention.png)",
            "",
        ]
    if "attention_influence" in result:
        ai = result["attention_influence"]
        lines += [
            "## AttentionInfluence",
            "",
            f"heads {ai['heads']} (top 5% by zero-ablation loss change) made "
            f"uniform: mean score {ai['mean']:+.4f}, max {ai['max']:+.4f}",
            "",
        ]
    return "\n".join(lines)


def write_report(name: str, result: dict, out_dir: Path, seconds: float, overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        refuse_existing(out_dir, REPORT_FILES, overwrite=overwrite)
        plot_heads(result, out_dir / "heads.png")
        plot_attention(result, out_dir / "attention.png")
        atomic_write_json(out_dir / "results.json", to_json_safe(tensors_to_lists(result)))
        atomic_write_text(out_dir / "report.md", report_markdown(name, result, seconds))
    return out_dir / "report.md"


def tensors_to_lists(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: tensors_to_lists(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [tensors_to_lists(v) for v in obj]
    return obj


def analyze_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    models: str = "*",
    task: str | None = None,
    corpus: str | None = None,
    batches: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    say=print,
) -> list[Path]:
    """Analyse every saved model of a run folder (or one model folder); one report per model, in
    ``out/<model>/`` (default: ``<model folder>/analysis``). Returns the report paths."""
    from gatelab.lab.inspect import check_inside, find_model_dirs, task_of
    from gatelab.lab.models.lm import LM

    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be positive, got {batches}, {batch_size}")
    paths, tasks = [], {}
    for model_dir in find_model_dirs(run, models):
        check_inside(model_dir, Path(run))
        model = LM.load(model_dir)
        the_task = task_of(model_dir, task, tasks, corpus=corpus, say=say)
        data = the_task.eval_batches(batches, batch_size, seed=seed)
        other = the_task.eval_batches(batches, batch_size, seed=seed + 1)
        inputs, targets = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        start = time.perf_counter()
        result = analyze_lm(model, inputs, targets, torch.cat([b[0] for b in other]))
        seconds = time.perf_counter() - start
        target_dir = model_dir / "analysis" if out is None else Path(out) / model_dir.name
        paths.append(
            write_report(f"{model_dir.name} on {the_task.name}", result, target_dir, seconds, overwrite)
        )
        say(f"{model_dir.name}: {paths[-1]} ({seconds:.1f} s)")
    return paths


__all__ = ["analyze_lm", "analyze_run", "write_report", "report_markdown", "plot_heads", "REPORT_FILES"]
