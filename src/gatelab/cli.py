"""The gatelab command line: ``gatelab list | compare | train | inspect | cache | bench``.

Each sub-command is a small function taking parsed arguments, registered in ``COMMANDS`` with the
function that adds its arguments. ``list`` lives here; the others live in ``gatelab/commands/<name>.py``
and are picked up automatically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn):
        COMMANDS[name] = (add_arguments, fn)
        return fn

    return wrap


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default=None, help="only this family (softmax, linear, sparse, gate)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (as in the README)")


@command("list", _list_arguments)
def cmd_list(args: argparse.Namespace) -> int:
    """Print the registry as a table."""
    from rich.console import Console
    from rich.table import Table

    from gatelab.registry import list_mechanisms

    columns = ("key", "family", "causal", "bidirectional", "backends", "status", "paper")
    rows = [
        (
            spec.key,
            spec.family,
            "yes" if spec.causal else "-",
            "yes" if spec.bidirectional else "-",
            ", ".join(spec.backends),
            spec.status,
            spec.paper,
        )
        for spec in list_mechanisms(family=args.family)
    ]
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(f"`{row[0]}`" if i == 0 else cell for i, cell in enumerate(row)) + " |")
        return 0
    table = Table(title="gatelab mechanisms")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped output: do not wrap every paper title into a column
    console.print(table)
    return 0


def _load_commands() -> None:
    """Import the modules that add sub-commands (kept out of import time of the package itself)."""
    import importlib
    import pkgutil

    import gatelab.commands

    for info in pkgutil.iter_modules(gatelab.commands.__path__):
        importlib.import_module(f"gatelab.commands.{info.name}")


def main(argv: list[str] | None = None) -> int:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="gatelab", description="gated and efficient attention: mechanisms and lab"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        add_arguments(p)
        p.set_defaults(_run=fn)
    args = parser.parse_args(argv)
    from gatelab.lab.rundir import RunDirBusy

    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RunDirBusy) as error:
        # the library's refusals (bad input, a run folder in use or holding an earlier run): one line, exit 2
        print(f"gatelab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as ``python -m gatelab.cli`` (e.g. under torchrun): use the imported module, whose COMMANDS the
    # sub-command modules register into, not this ``__main__`` copy.
    from gatelab.cli import main as _main

    sys.exit(_main())
