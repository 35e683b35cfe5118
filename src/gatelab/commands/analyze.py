"""``gatelab analyze RUN | --hf PATH | --planted``: the head and circuit report (tables + layer x head heat
maps) of a run folder's saved models, of a transformers checkpoint, or the planted-truth validation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatelab.cli import command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", nargs="?", default=None, help="a model folder or a gatelab compare/train run folder"
    )
    parser.add_argument("--hf", default=None, help="a transformers checkpoint folder instead of a run")
    parser.add_argument(
        "--planted",
        action="store_true",
        help="run the planted-truth validation (trains a small MQAR LM; needs --out)",
    )
    parser.add_argument("--out", default=None, help="report folder (default: <model folder>/analysis)")
    parser.add_argument(
        "--models", default="*", help="in a run folder, only model folders matching this glob"
    )
    parser.add_argument(
        "--task", default=None, help="task to analyse on (default: the one it was trained on)"
    )
    parser.add_argument("--corpus", default=None, help="text task: the corpus to read")
    parser.add_argument(
        "--text", default=None, help="--hf causal LM: the text file whose next tokens are scored"
    )
    parser.add_argument("--seq-len", type=int, default=64, help="--hf causal LM: tokens per row (default 64)")
    parser.add_argument("--batches", type=int, default=2, help="validation batches (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation batches")
    parser.add_argument(
        "--steps", type=int, default=1000, help="--planted: MQAR training steps (default 1000)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in the folder")


@command("analyze", _arguments)
def cmd_analyze(args: argparse.Namespace) -> int:
    """Head and circuit analysis: ablation, patching, DLA, gate heads, attention metrics."""
    chosen = [name for name, on in (("RUN", args.run), ("--hf", args.hf), ("--planted", args.planted)) if on]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of RUN, --hf PATH or --planted, got {chosen or 'none'}")

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if args.planted:
        from gatelab.lab.analyze_planted import validate

        if args.out is None:
            raise ValueError(
                "--planted needs --out DIR (the trained model, the figure and the numbers go there)"
            )
        validate(Path(args.out), steps=args.steps, overwrite=args.overwrite, say=say)
    elif args.hf:
        from gatelab.lab.analyze_hf import analyze_hf

        out = args.out if args.out is not None else Path(args.hf) / "analysis"
        analyze_hf(args.hf, out, text=args.text, seq_len=args.seq_len, overwrite=args.overwrite, say=say)
    else:
        from gatelab.lab.analyze import analyze_run

        analyze_run(
            args.run,
            args.out,
            models=args.models,
            task=args.task,
            corpus=args.corpus,
            batches=args.batches,
            batch_size=args.batch_size,
            seed=args.seed,
            overwrite=args.overwrite,
            say=say,
        )
    return 0
