"""``gatelab cache``: the command line of :func:`gatelab.lab.cache` (KV-cache policies and budgets: quality vs
memory when decoding contexts longer than the LM's training window)."""

from __future__ import annotations

import argparse
import shlex
import sys

from gatelab.cli import command
from gatelab.lab.kv.study import RECENT_SHARE, aggregate_rows  # noqa: F401 (aggregate_rows: a public name)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated fractions, got {text!r}") from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="text,mqar", help="comma-separated: text, mqar (default: both)")
    parser.add_argument("--policies", default="full,streaming,h2o,attention_gate", help="policies to run")
    parser.add_argument("--budgets", default="1.0,0.5,0.25,0.1", help="fractions of the cache kept")
    parser.add_argument("--steps", type=int, default=None, help="base training steps (default per task)")
    parser.add_argument("--gate-steps", type=int, default=None, help="attention-gate fine-tuning steps")
    parser.add_argument(
        "--gate-recent", type=int, default=None,
        help="also run the attention gate with recent blocks of this many tokens (default: eval length / "
        f"{RECENT_SHARE}; 0: only the paper's gate)",
    )  # fmt: skip
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument(
        "--eval-batches", type=int, default=None, help="evaluation batches (default per task)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=None, help="rows per evaluation batch")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds from --seed on; tables give mean ± std")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: one-token decode steps are too small to split across cores)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="run folder (default: runs/cache-<UTC time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")


@command("cache", _arguments)
def cmd_cache(args: argparse.Namespace) -> int:
    """KV-cache policies (full, streaming, h2o, attention_gate): quality vs memory when decoding long contexts."""
    from gatelab.lab.kv.study import CacheStudy, cache

    study = CacheStudy(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        budgets=tuple(_floats(args.budgets, "--budgets")),
        **{k: getattr(args, k) for k in ("steps", "gate_steps", "gate_recent", "d_model", "n_layers", "n_heads",
                                          "eval_batches", "eval_batch_size", "seed", "seeds", "threads", "quick")},
    )  # fmt: skip
    command_line = "gatelab cache " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    cache(study, args.out, overwrite=args.overwrite, command_line=command_line)
    return 0
