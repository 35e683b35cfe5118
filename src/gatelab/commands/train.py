"""``gatelab train``: train one configuration (pattern, task, sizes) and save the model and its metrics.

    gatelab train --pattern "gated_deltanet*3,gated_softmax" --task mqar --d-model 64 --layers 4 \\
        --steps 2000 --out runs/hybrid
    torchrun --standalone --nproc_per_node 2 -m gatelab.cli train ...   # DDP (gloo on CPU, NCCL on GPU)
    torchrun --standalone --nproc_per_node 2 -m gatelab.cli train --parallel fsdp ...   # FSDP2: sharded
"""

from __future__ import annotations

import argparse

from gatelab.cli import command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pattern", default="softmax", help="mixer per layer, e.g. 'softmax', 'gated_deltanet*3,softmax'"
    )
    p.add_argument(
        "--task", default="mqar", help="mqar | text | idle | digits | digits_seg (pattern: the vision block)"
    )
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--seq-len", type=int, default=None, help="task sequence length (task default if omitted)")
    p.add_argument("--vocab-size", type=int, default=None, help="mqar / idle vocabulary (text is bytes: 256)")
    p.add_argument("--corpus", default=None, help="text task: a text file or folder (default: Python stdlib)")
    p.add_argument(
        "--task-option", action="append", default=[], metavar="NAME=VALUE", help="e.g. num_kv_pairs=8"
    )
    p.add_argument(
        "--mixer-option",
        action="append",
        default=[],
        metavar="KEY.NAME=VALUE",
        help="e.g. gated_softmax.gate=headwise",
    )
    p.add_argument(
        "--arch", default=None, choices=["llama", "gpt2"],
        help="llama: RoPE, RMSNorm, SwiGLU (the default); gpt2: learned positions, LayerNorm, GELU MLP "
        "(--positions / --norm / --mlp override it)",
    )  # fmt: skip
    p.add_argument(
        "--positions", default=None, choices=["rope", "learned", "none"],
        help="rope (each mixer's own, default), learned (absolute embedding) or none (NoPE)",
    )  # fmt: skip
    p.add_argument(
        "--norm", default=None, choices=["rms", "layer"], help="rms (default) or layer (LayerNorm)"
    )
    p.add_argument(
        "--mlp",
        default=None,
        help="every block's MLP: swiglu (default), gelu, or moe:<router> (gatelab list --family gate)",
    )
    p.add_argument(
        "--mlp-option", action="append", default=[], metavar="NAME=VALUE",
        help="MoE MLP options, e.g. n_experts=8, k=1, capacity_factor=1.25 (LMConfig.mlp_options)",
    )  # fmt: skip
    p.add_argument(
        "--attention-gate", action="append", default=None, metavar="NAME=VALUE",
        help="train KV-cache eviction gates with the LM on its softmax-family layers, e.g. "
        "--attention-gate target_keep=0.5 [--attention-gate recent=16] (options of gatelab.cache's gate)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="default: min(100, steps // 10)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 10")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--parallel", choices=("ddp", "fsdp"), default="ddp",
        help="under torchrun: a full replica per rank (ddp) or parameters, gradients and optimizer states "
        "sharded over the ranks (fsdp, FSDP2); one process trains the plain model either way",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="run folder (default runs/train-<task>-<pattern>)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _pairs(items: list[str], flag: str) -> list[tuple[str, object]]:
    from gatelab.lab.spec import parse_value

    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        out.append((name, parse_value(value)))
    return out


def run_spec(args: argparse.Namespace):
    """The RunSpec an argument namespace describes (--arch, then --positions / --norm / --mlp over it)."""
    from gatelab.lab.models.lm import DEFAULT_ARCH, architecture
    from gatelab.lab.spec import RunSpec

    task_options = dict(_pairs(args.task_option, "--task-option"))
    if args.seq_len is not None:
        task_options["seq_len"] = args.seq_len
    if args.vocab_size is not None:
        task_options["vocab_size"] = args.vocab_size
    if args.corpus is not None:
        if args.task != "text":
            raise ValueError(f"--corpus applies to --task text only, got --task {args.task}")
        task_options["corpus"] = args.corpus
    mixer_options: dict[str, dict] = {}
    for name, value in _pairs(args.mixer_option, "--mixer-option"):
        key, dot, option = name.partition(".")
        if not dot:
            raise ValueError(f"--mixer-option takes KEY.NAME=VALUE (KEY a mechanism or '*'), got {name!r}")
        mixer_options.setdefault(key, {})[option] = value
    arch = architecture(args.arch) if args.arch is not None else DEFAULT_ARCH
    given = {"positions": args.positions, "norm": args.norm, "mlp": args.mlp}
    fields = {k: arch[k] if v is None else v for k, v in given.items()}
    return RunSpec(
        task=args.task, task_options=task_options, pattern=args.pattern, mixer_options=mixer_options,
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, mlp_ratio=args.mlp_ratio,
        **fields, mlp_options=dict(_pairs(args.mlp_option, "--mlp-option")),
        attention_gate=None if args.attention_gate is None else dict(_pairs(args.attention_gate, "--attention-gate")),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup if args.warmup is not None else min(100, args.steps // 10),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every if args.eval_every is not None else max(1, args.steps // 10),
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every, compile=args.compile,
        seed=args.seed, device=args.device, parallel=args.parallel,
    )  # fmt: skip


@command("train", _add_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration (pattern, task, sizes) and save the model and metrics."""
    from gatelab.lab.spec import train_run

    spec = run_spec(args)
    out = args.out or f"runs/train-{args.task}-{args.pattern.replace('*', 'x').replace(',', '+')}"
    train_run(
        spec, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, log=print
    )
    return 0
