"""``gatelab inspect RUN``: the diagnostics of saved models (a model folder, or every model of a
``gatelab compare`` run folder), per layer, on the validation batches of the task they were trained on."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gatelab.cli import command
from gatelab.lab.inspect import check_inside, find_model_dirs, task_of

__all__ = ["cmd_inspect", "find_model_dirs", "print_diagnostics", "task_of"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_diagnostics(name: str, result: dict, console) -> None:
    from rich.table import Table

    s = result["summary"]
    table = Table(
        title=f"{name}: sink baseline (uniform) {_fmt(result['sink_share_uniform'], '.3f')}, "
        f"loss fp32 {_fmt(result.get('loss_fp32'), '.4f')}, W8A8 {_fmt(result.get('loss_w8a8'), '.4f')} "
        f"(gap {_fmt(result.get('w8a8_gap'), '+.4f')})"
    )
    for column in (
        "layer", "mixer", "sink share", "sink per head", "attn entropy", "max act", "act max/median",
        "token kurtosis", "block inf-norm", "block kurtosis", "gate mean", "gate < 0.1",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in ("layer", "mixer", "sink per head") else "right")
    for i, key in enumerate(result["layers"]):
        heads = result["sink_share"][i]
        table.add_row(
            str(i + 1),
            str(key),
            _fmt(result["sink_share_layer"][i], ".3f"),
            "-" if heads is None else " ".join(f"{h:.2f}" for h in heads),
            _fmt(result["attn_entropy_layer"][i], ".2f"),
            _fmt(result["max_activation"][i + 1], ".2f"),
            _fmt(result["massive_ratio"][i + 1], ".0f"),
            _fmt(result["residual_kurtosis"][i + 1], ".1f"),
            _fmt(result["block_inf_norm"][i], ".2f"),
            _fmt(result["block_kurtosis"][i], ".1f"),
            _fmt(result["gate_mean"][i], ".3f"),
            _fmt(result["gate_frac_below"][i], ".2f"),
        )
    console.print(table)
    console.print(
        f"  summary: sink share {_fmt(s['sink_share'], '.3f')}, max act {_fmt(s['max_activation'], '.2f')}, "
        f"max inf-norm {_fmt(s['max_inf_norm'], '.2f')}, avg kurtosis {_fmt(s['avg_kurtosis'], '.1f')}"
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="a model folder (config.json + model.safetensors) or a gatelab compare run folder"
    )
    parser.add_argument(
        "--task", default=None, help="task to evaluate on (default: the one it was trained on)"
    )
    parser.add_argument(
        "--models", default="*", help="in a run folder, only model folders matching this glob"
    )
    parser.add_argument(
        "--corpus", default=None,
        help="text task: the corpus to evaluate on (a corpus path a run folder names is never read otherwise)",
    )  # fmt: skip
    parser.add_argument("--batches", type=int, default=4, help="validation batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-quant", action="store_true", help="skip the W8A8 loss")
    parser.add_argument("--json", action="store_true", help="print the diagnostics as JSON instead of tables")


@command("inspect", _arguments)
def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the diagnostics of a saved model (a model folder or a compare run folder)."""
    from rich.console import Console

    from gatelab.lab.diagnostics import diagnose
    from gatelab.lab.models.lm import LM
    from gatelab.lab.report import to_json_safe

    if args.batches < 1 or args.batch_size < 1:
        raise ValueError(
            f"--batches and --batch-size must be positive, got {args.batches}, {args.batch_size}"
        )
    console = Console()
    if console.width < 160 and not console.is_terminal:
        console = Console(width=160)
    everything, tasks, failed = {}, {}, 0

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    model_dirs = find_model_dirs(args.run, args.models)
    for model_dir in model_dirs:
        try:  # one bad model (torn file, unreadable summary, foreign corpus) must not hide the others
            check_inside(model_dir, Path(args.run))
            model = LM.load(model_dir, device=args.device)
            task = task_of(model_dir, args.task, tasks, corpus=args.corpus, say=say)
            if task.vocab_size > model.config.vocab_size:
                raise ValueError(
                    f"{model_dir}: task {task.name!r} has vocab_size {task.vocab_size}, the model only "
                    f"{model.config.vocab_size}"
                )
            batches = task.eval_batches(args.batches, args.batch_size, seed=args.seed)
            result = diagnose(model, batches, quantization=not args.no_quant)
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            failed += 1
            everything[str(model_dir)] = {"error": f"{type(error).__name__}: {error}"}
            say(f"gatelab inspect: skipped {model_dir}: {error}")
            continue
        everything[str(model_dir)] = result
        if not args.json:
            print_diagnostics(f"{model_dir.name} on {task.name}", result, console)
    if args.json:
        print(json.dumps(to_json_safe(everything), indent=1))
    if failed:
        say(f"gatelab inspect: {failed} of {len(model_dirs)} model(s) could not be inspected (see above)")
    return 1 if failed else 0
