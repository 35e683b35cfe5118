"""``gatelab merge``: one report from comparisons run as separate processes (per task or per seed)."""

from __future__ import annotations

import argparse

from gatelab.cli import command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders written by gatelab compare (one preset)")
    parser.add_argument("--out", required=True, help="a new folder for the merged report (never an input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier merge in --out")


@command("merge", _arguments)
def cmd_merge(args: argparse.Namespace) -> int:
    """Merge gatelab compare run folders of one preset into one report (mean and spread over all seeds)."""
    from rich.console import Console

    from gatelab.lab.report import merge_results, print_tables

    merged = merge_results(args.runs, args.out, overwrite=args.overwrite)
    print_tables(merged)
    dropped = f" ({merged['duplicate_runs']} duplicate runs kept once)" if merged["duplicate_runs"] else ""
    Console().print(f"wrote {args.out}/report.md from {len(args.runs)} run folders{dropped}")
    return 0
