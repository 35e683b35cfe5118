"""``gatelab compare``: the command line of :func:`gatelab.lab.compare` (train a set of mixers and variants
on the lab's tasks under one budget and seed, evaluate and diagnose them, write runs/<name>/)."""

from __future__ import annotations

import argparse

from gatelab.cli import command
from gatelab.lab.comparison import apply_overrides, check_memory, select_mixers  # noqa: F401 (public names)
from gatelab.lab.presets import PRESETS


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="budget and sizes (default: default)"
    )
    parser.add_argument(
        "--mixers", default=None,
        help="comma-separated mixer keys or variants, e.g. 'softmax,gated_softmax[gate=headwise],"
        "gated_softmax[gate=elementwise,name=gs_elem]' (default: the preset's / every causal one)",
    )  # fmt: skip
    parser.add_argument(
        "--mlp", default=None,
        help="MLP choices run with every mixer: comma-separated 'swiglu' and 'moe:<router>' (routers: "
        "gatelab list --family gate), e.g. 'swiglu,moe:topk,moe:comet' (default: SwiGLU)",
    )  # fmt: skip
    parser.add_argument(
        "--arch", default=None,
        help="architectures run with every mixer: comma-separated gpt2 (learned positions, LayerNorm, GELU "
        "MLP) and llama (RoPE, RMSNorm, SwiGLU; the default), e.g. 'gpt2,llama'",
    )  # fmt: skip
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks: mqar, text, idle, digits, digits_seg (default: the preset's)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (overrides the preset)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (overrides the preset)")
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed; the preset's number of seeds follow it"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    parser.add_argument(
        "--lrs", default=None,
        help="learning rates, comma-separated, e.g. 1e-4,4.6e-4,2.2e-3,1e-2: every run trains at each and the "
        "table reports the best per mixer and the spread (Zoology's protocol; default: the preset's)",
    )  # fmt: skip
    parser.add_argument(
        "--early-stop", type=float, default=None, metavar="ACC",
        help="stop a run when its validation accuracy reaches ACC, e.g. 0.99 (default: the preset's)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None,
        help="split the runs over this many processes of one CPU thread each and merge their reports "
        "(default: the preset's: 2 for default, reproduce and zoology_cpu, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--shard", default=None, metavar="K/N",
        help="run every N-th run from the K-th (split a comparison over processes; join them with "
        "gatelab merge)",
    )  # fmt: skip
    parser.add_argument(
        "--corpus", default=None, help="text file or folder for the text task (default: the stdlib)"
    )
    parser.add_argument("--name", default=None, help="run folder name (default: the preset's name)")
    parser.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results and models of an earlier run in the folder",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--kv-cache", default=None,
        help="also decode each trained softmax-family model under these KV-cache policies: comma-separated "
        "streaming, h2o, attention_gate, lychee ('full' is always the reference row; default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-budgets", default=None,
        help="KV-cache budgets as fractions in (0, 1] of the sequence length (default: 0.5,0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-gate-steps", type=int, default=None,
        help="fine-tuning steps of the attention gates per budget (default: 100)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-context", type=int, default=None,
        help="decode sequences this many times the training length (default: 1, the training length)",
    )  # fmt: skip


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: every option given a value other than its default."""
    parser = argparse.ArgumentParser()
    _arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = [
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in defaults and v != defaults[k]
    ]
    return " ".join(["gatelab compare", *parts])


@command("compare", _arguments)
def cmd_compare(args: argparse.Namespace) -> int:
    """Train and compare mixers on the lab's tasks; write report.md, results.json and plots."""
    from gatelab.lab.comparison import compare
    from gatelab.lab.kv.rows import failures, parse_options
    from gatelab.lab.spec import split_list

    results = compare(
        args.preset,
        mixers=args.mixers,
        tasks=None if args.tasks is None else split_list(args.tasks, "--tasks"),
        seed=args.seed, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size, device=args.device,
        corpus=args.corpus, mlp=args.mlp, arch=args.arch, lrs=args.lrs, early_stop=args.early_stop, shard=args.shard,
        workers=args.workers,
        kv_cache=parse_options(args.kv_cache, args.kv_budgets, args.kv_gate_steps, args.kv_context),
        out=args.out, name=args.name, threads=args.threads, overwrite=args.overwrite,
        command_line=_command_line(args),
    )  # fmt: skip
    return (
        0
        if all(r["status"] in ("ok", "skipped") for r in results["runs"]) and not failures(results["runs"])
        else 1
    )
