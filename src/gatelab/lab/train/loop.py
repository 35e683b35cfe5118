"""The training loop: one process, or DDP or FSDP2 under torchrun, checkpoints and exact resume, JSONL
metrics."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from gatelab.lab.rundir import atomic_write_text, check_writable, locked
from gatelab.lab.tasks import IGNORE, Task

from .checkpoint import load_checkpoint, read_metrics, refuse_earlier_run, remove_earlier_run, save_checkpoint
from .config import TrainConfig, TrainResult, lr_at, run_spec
from .groups import check_terms, default_terms, optimizer_groups, term_value
from .runtime import Ranks, check_memory, max_rss_bytes
from .sharding import Sharded, sharded_term


def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    *,
    groups: list[dict] | None = None,
    extra_losses: dict | None = None,
    monitors: dict | None = None,
    pre_step: Callable | None = None,
) -> TrainResult:
    """Train ``model`` (an LM) on ``task``; returns the history and final eval metrics.

    ``groups``: AdamW parameter groups with their own peak learning rates, frozen parameters left out (see
    :func:`optimizer_groups`; default: weight decay on matrices only, all at config.lr). ``extra_losses``:
    name -> callable(model) returning a scalar added to the loss after each forward, logged under its name
    in the train rows; ``monitors``: name -> callable(model) returning a number logged there. Left None, a
    model with attention gates brings its eviction-rate loss ("eviction") and kept fraction ("kept").
    ``pre_step``: callable(loss_fn) run before each optimizer step with a function that returns this
    batch's task loss (a fresh forward, scaled as the step's): a pass of its own, e.g. Gradient Routing's
    gate pass (:class:`gatelab.lab.train.routing.GradientRouting`); its state is not checkpointed.

    Under torchrun every rank draws the same global batch and trains on its slice; the loss of each slice
    is normalised by the global count of labelled tokens, so the summed gradients equal those of one
    process on the whole batch. ``config.parallel="fsdp"`` shards the model, its gradients and the AdamW
    states over the ranks (FSDP2, see :mod:`.sharding`) instead of replicating them; the checkpoint and the
    saved model hold the full tensors either way, so a run resumes under either mode or in one process.
    Rank 0 holds the lock of ``out_dir`` for the whole run and writes the
    files: ``metrics.jsonl`` (one JSON row per logged step and per eval), ``checkpoint/`` and, at the end,
    the model (``model.safetensors`` + ``config.json`` + ``manifest.json``) and ``train_summary.json``.
    An ``out_dir`` holding an earlier run is refused unless ``config.resume`` or ``config.overwrite``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if pre_step is not None and not callable(pre_step):
        raise TypeError(
            f"pre_step must be a callable taking the loss function, got {type(pre_step).__name__}"
        )
    if pre_step is not None and config.resume:
        raise ValueError("resume is not supported with a pre_step (its optimizer state is not checkpointed)")
    default_losses, default_monitors = default_terms(model)
    extra_losses = check_terms(default_losses if extra_losses is None else extra_losses, "extra_losses")
    monitors = check_terms(default_monitors if monitors is None else monitors, "monitors")
    ranks = Ranks.setup(config.device)
    if ranks.world > 1 and config.batch_size % ranks.world:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the {ranks.world} DDP ranks")
    if pre_step is not None and config.parallel == "fsdp" and ranks.world > 1:
        raise ValueError(
            "parallel='fsdp' does not support a pre_step (its own pass over the model); use 'ddp'"
        )
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            check_writable(out_dir, "out_dir")
            if ranks.rank == 0:  # the only writer; other ranks read the checkpoint at most
                stack.enter_context(locked(out_dir))
            if not config.resume:
                refuse_earlier_run(out_dir, config.overwrite)
            ranks.barrier()  # every rank has looked at the folder before rank 0 changes it
            if config.overwrite and not config.resume and ranks.rank == 0:
                remove_earlier_run(out_dir)
        result = _run(model, task, config, ranks, out_dir, groups, extra_losses, monitors, stack, pre_step)
    ranks.close()
    return result


def _run(model, task, config, ranks, out_dir, groups, extra_losses, monitors, stack, pre_step) -> TrainResult:
    device = torch.device(config.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    check_memory(model, task.seq_len, config.batch_size // ranks.world, device)
    model.to(device)
    raw_model = model
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    groups = optimizer_groups(model, config, groups)
    spec = run_spec(raw_model, task, config, groups, extra_losses) if out_dir is not None else None
    writer = out_dir is not None and ranks.rank == 0
    sharded = None  # FSDP2: the model sharded in place (raw_model is that module), groups on its shards
    if config.parallel == "fsdp" and ranks.world > 1:
        sharded = Sharded(model, groups, device, ranks.world, keep_copy=writer)
        groups = sharded.groups
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    start, history = 0, []
    if config.resume:
        restore = None if sharded is None else lambda tensors, state: sharded.load(optimizer, tensors, state)
        start = load_checkpoint(out_dir, raw_model, optimizer, generator, spec=spec, restore=restore)
        history = read_metrics(out_dir / "metrics.jsonl", start)
    if writer:  # rewrite the metrics so far (drops rows logged after the checkpoint we resume from)
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def checkpoint(step: int, final: bool = False) -> None:
        """Rank 0 writes the checkpoint (and the final model): under FSDP every rank first joins in
        gathering the full states, so the files are those of one process."""
        model_out, optimizer_state = raw_model, None
        if sharded is not None:
            model_out = sharded.full_model()
            optimizer_state = sharded.full_optimizer_state(optimizer)
        if writer:
            save_checkpoint(
                out_dir, model_out, optimizer, step, generator, spec, optimizer_state=optimizer_state
            )
            if final:
                model_out.save(out_dir)

    if ranks.world > 1 and sharded is None:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(model) if config.compile else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and config.autocast
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = max_rss_bytes()
    eval_batch_size = config.eval_batch_size or config.batch_size
    local = config.batch_size // ranks.world
    advance = _progress_bar(stack, config, task, start) if config.progress and ranks.rank == 0 else None

    def log(row: dict) -> None:
        history.append(row)
        if writer:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(step: int) -> dict:
        metrics = task.evaluate(
            raw_model, n_batches=config.eval_batches, batch_size=eval_batch_size, seed=config.seed
        )
        log({"step": step, "split": "val", **metrics})
        return metrics

    model.train()
    t_start, train_time, tokens = time.perf_counter(), 0.0, 0
    metrics: dict = {}
    end = min(config.steps, config.stop_after or config.steps)
    last = history[-1] if history else {}
    stopped = last.get("split") == "val" and last.get("step") == start and _reached(last, config)
    if stopped:  # a resumed run that had already stopped early: nothing left to train
        end, metrics = start, last
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:  # a group with its own peak lr follows the same schedule, scaled
            group["lr"] = lr_at(step, config, peak=group["peak_lr"])
        inputs, targets = task.get_batch("train", config.batch_size, generator)  # the global batch
        n_labels = int((targets != IGNORE).sum())
        inputs = inputs[ranks.rank * local : (ranks.rank + 1) * local].to(device)
        targets = targets[ranks.rank * local : (ranks.rank + 1) * local].to(device)
        loss, terms = _step(
            forward,
            model,
            optimizer,
            inputs,
            targets,
            n_labels,
            config,
            ranks,
            autocast,
            extra_losses,
            pre_step,
        )
        dt = time.perf_counter() - t0
        train_time += dt
        tokens += inputs.numel() * ranks.world
        done = step + 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {done}; lower the lr (now {config.lr})")
        if done % config.log_every == 0 or done == config.steps:
            row = {
                "step": done,
                "split": "train",
                "loss": loss,
                "lr": lr,
                "tokens_per_s": inputs.numel() * ranks.world / dt,
            }
            row.update(_term_values(terms, ranks))
            row.update({name: fn(raw_model) for name, fn in monitors.items()})
            log(row)
        if (
            config.eval_batches
            and config.eval_every
            and done % config.eval_every == 0
            and done != config.steps
        ):
            metrics = evaluate(done)
            if _reached(metrics, config):
                stopped, end = True, done
        if (
            out_dir is not None
            and config.checkpoint_every
            and done % config.checkpoint_every == 0
            and done != config.steps
        ):
            checkpoint(done)
            ranks.barrier()
        if advance is not None:
            advance(loss, tokens / max(train_time, 1e-9))
        if stopped:
            break
    finished = end == config.steps or stopped
    if finished and config.eval_batches:
        last = history[-1] if history else {}
        metrics = last if last.get("split") == "val" and last.get("step") == end else evaluate(end)
    final = {k: v for k, v in metrics.items() if k not in ("step", "split")} if finished else {}
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = max(0, max_rss_bytes() - rss_start), "cpu_max_rss_delta"
    result = TrainResult(
        history=history,
        final=final,
        wall_s=time.perf_counter() - t_start,
        tokens_per_s=tokens / max(train_time, 1e-9),
        peak_memory_bytes=int(peak),
        peak_memory_kind=kind,
        steps=end,
        num_parameters=sum(p.numel() for p in raw_model.parameters()),
        stopped_early=stopped,
    )
    if out_dir is not None:
        checkpoint(end, final=finished)
    if writer and finished:
        _write_summary(out_dir, result, config, task, ranks.world, start)
    ranks.barrier()
    return result


def _reached(metrics: dict, config: TrainConfig) -> bool:
    """Whether an evaluation's accuracy reaches ``config.early_stop`` (False when it is None)."""
    if config.early_stop is None:
        return False
    if "accuracy" not in metrics:
        raise ValueError(f"early_stop needs an accuracy from the task's evaluation, got {sorted(metrics)}")
    return metrics["accuracy"] >= config.early_stop


def _step(
    forward, model, optimizer, inputs, targets, n_labels, config, ranks, autocast, extra_losses, pre_step=None
):
    """One optimizer step on this rank's slice (inputs, targets (B / world, T)) of the global batch, whose
    labelled tokens number ``n_labels``; returns the global mean cross-entropy and the extra terms.
    ``pre_step(loss_fn)`` first runs a pass of its own (Gradient Routing's gate pass)."""

    def loss_sum_of_batch() -> torch.Tensor:
        with autocast:
            logits = forward(inputs)[0]
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    # DDP averages gradients over ranks: scale so the average is the gradient of the global mean.
    # Extra terms (an attention gate's eviction-rate loss) are means per rank, averaged the same way.
    scale = ranks.world / max(n_labels, 1)
    if pre_step is not None:
        pre_step(lambda: loss_sum_of_batch() * scale)
    loss_sum = loss_sum_of_batch()
    total = loss_sum * scale
    sharded = isinstance(next(model.parameters()), DTensor)  # FSDP2
    terms = {
        name: term_value(name, sharded_term(name, fn, model) if sharded else fn(model))
        for name, fn in extra_losses.items()
    }
    for value in terms.values():
        total = total + value
    total.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_sum.detach()
    if ranks.world > 1:
        dist.all_reduce(loss)
    return loss.item() / max(n_labels, 1), terms


def _write_summary(
    out_dir: Path, result: TrainResult, config: TrainConfig, task: Task, world: int, start: int
):
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update(
        train_config=asdict(config),
        task=task.describe(),
        task_options=task.options,
        world_size=world,
        resumed_from_step=start,
    )
    atomic_write_text(out_dir / "train_summary.json", json.dumps(summary, indent=2, default=str))


def _term_values(terms: dict, ranks: Ranks) -> dict[str, float]:
    """The extra loss terms of this step as numbers, averaged over DDP ranks."""
    if not terms:
        return {}
    values = torch.tensor(
        [float(v.detach() if isinstance(v, torch.Tensor) else v) for v in terms.values()], dtype=torch.float64
    )
    if ranks.world > 1:
        dist.all_reduce(values)
        values /= ranks.world
    return dict(zip(terms, values.tolist()))


def _progress_bar(stack: contextlib.ExitStack, config: TrainConfig, task: Task, start: int):
    """One rich progress bar on stderr (closed with ``stack``); returns advance(loss, tokens_per_s)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = stack.enter_context(
        Progress(
            TextColumn("train {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )  # fmt: skip
    )
    bar = progress.add_task(task.name, total=config.steps, completed=start, status="")

    def advance(loss: float, tokens_per_s: float) -> None:
        progress.update(bar, advance=1, status=f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s")

    return advance
