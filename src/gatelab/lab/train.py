"""The trainer: AdamW, warmup + cosine, gradient clipping, bf16 autocast on CUDA, JSONL metrics, atomic
checkpoints and exact resume; one process or DDP under torchrun (gloo on CPU, NCCL on GPU)
(Decoupled Weight Decay Regularization, Loshchilov et al., 2019)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gatelab.cache import eviction_loss
from gatelab.lab.tasks import IGNORE, Task

CHECKPOINT = "checkpoint"  # folder in out_dir: model.safetensors, config.json, trainer.pt


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch (split across DDP ranks)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1  # on matrices only; not on norms, biases, embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    eval_batch_size: int | None = None  # None: batch_size
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when out_dir is given)
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in out_dir (without it or resume, such a folder is refused)
    progress: bool = True
    compile: bool = False
    log_every: int = 1  # a train row in history / metrics.jsonl every N steps
    stop_after: int | None = (
        None  # stop after this many steps (checkpointed), as if interrupted; resume later
    )

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ValueError(f"stop_after must be a positive int or None, got {self.stop_after!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # train rows {step, loss, lr, tokens_per_s}; eval rows
    final: dict = field(default_factory=dict)  # final eval metrics
    wall_s: float = 0.0
    tokens_per_s: float = 0.0  # tokens fed per second of training (all ranks), excluding eval
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""  # "cuda_max_allocated" or "cpu_max_rss_delta"
    steps: int = 0
    num_parameters: int = 0


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to lr * min_lr_ratio at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear-like layers: no decay on norms, biases, embeddings (GPT-2, nanoGPT)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def estimate_memory_bytes(model: nn.Module, seq_len: int, batch_size: int) -> int:
    """A rough, deliberately generous estimate of the memory one training step needs: parameters,
    gradients and the two AdamW moments (4 fp32 copies), activations kept for backward (about
    (12 + 3 * mlp_ratio) fp32 vectors of d_model per token and layer), dense attention scores and
    probabilities in every layer (the worst case), and the logits with their gradient."""
    c = model.config
    B, T = batch_size, seq_len
    params = 16 * sum(p.numel() for p in model.parameters())
    activations = 4 * B * T * c.d_model * c.n_layers * (12 + 3 * c.mlp_ratio)
    scores = 4 * 2 * B * c.n_heads * T * T * c.n_layers
    logits = 4 * 3 * B * T * c.vocab_size
    return int(params + activations + scores + logits)


def check_memory(model: nn.Module, seq_len: int, batch_size: int, device: torch.device) -> None:
    """Refuse a size whose estimate exceeds the device's total memory, before allocating anything."""
    if not hasattr(model, "config") or not hasattr(model.config, "d_model"):
        return
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = estimate_memory_bytes(model, seq_len, batch_size)
    if need > total:
        raise ValueError(
            f"this run needs about {need / 2**30:,.1f} GiB of memory (batch {batch_size} x seq_len {seq_len}, "
            f"d_model {model.config.d_model}, {model.config.n_layers} layers) but {device.type} has "
            f"{total / 2**30:,.1f} GiB; lower batch_size, seq_len or the model size"
        )


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str) -> _Dist:
        """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world <= 1:
            return cls()
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"data": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, optimizer, step: int, generator: torch.Generator) -> None:
    """Write the checkpoint folder next to the old one, then swap it in by renames: a crash at any point
    leaves either the old or the new checkpoint whole."""
    final, tmp, old = out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.tmp", out_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(generator)}, tmp / "trainer.pt"
    )
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, model, optimizer, generator: torch.Generator) -> int:
    """Restore model, optimizer and RNG states; returns the number of steps already done."""
    from safetensors.torch import load_file

    folder = out_dir / CHECKPOINT
    if not folder.exists() and (out_dir / f"{CHECKPOINT}.old").exists():
        folder = out_dir / f"{CHECKPOINT}.old"  # a crash between the two renames of save_checkpoint
    if not (folder / "trainer.pt").is_file():
        raise FileNotFoundError(f"resume=True but no checkpoint in {out_dir}; train once with out_dir first")
    device = next(model.parameters()).device
    model.load_tensors(load_file(str(folder / "model.safetensors"), device=str(device)))
    state = torch.load(folder / "trainer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], generator)
    return int(state["step"])


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def train(model: nn.Module, task: Task, config: TrainConfig) -> TrainResult:
    """Train ``model`` (an LM) on ``task``; returns the history and final eval metrics.

    Under torchrun every rank draws the same global batch and trains on its slice; the loss of each slice
    is normalised by the global count of labelled tokens, so the summed gradients equal those of one
    process on the whole batch. Rank 0 writes the files: ``metrics.jsonl`` (one JSON row per logged
    step and per eval), ``checkpoint/`` and, at the end, the model (``model.safetensors`` +
    ``config.json``) and ``train_summary.json`` in ``out_dir``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    ranks = _Dist.setup(config.device)
    if ranks.world > 1 and config.batch_size % ranks.world:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the {ranks.world} DDP ranks")
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
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    writer = out_dir is not None and ranks.rank == 0
    start, history = 0, []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.resume:
            start = load_checkpoint(out_dir, raw_model, optimizer, generator)
            history = _read_metrics(out_dir / "metrics.jsonl", start)
    if writer:  # rewrite the metrics so far (drops rows logged after the checkpoint we resume from)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if ranks.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(model) if config.compile else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = _max_rss_bytes()
    eval_batch_size = config.eval_batch_size or config.batch_size
    local = config.batch_size // ranks.world
    bar = None
    if config.progress and ranks.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train {task.name}", dynamic_ncols=True)

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
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = task.get_batch("train", config.batch_size, generator)  # the global batch
        n_labels = int((targets != IGNORE).sum())
        inputs = inputs[ranks.rank * local : (ranks.rank + 1) * local].to(device)
        targets = targets[ranks.rank * local : (ranks.rank + 1) * local].to(device)
        with autocast:
            logits = forward(inputs)[0]
        loss_sum = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        # DDP averages gradients over ranks: scale so the average is the gradient of the global mean.
        # Attention gates (KV-cache eviction) add their eviction-rate loss, a mean per rank (0 without).
        (loss_sum * (ranks.world / max(n_labels, 1)) + eviction_loss(model)).backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_sum.detach()
        if ranks.world > 1:
            dist.all_reduce(loss)
        loss = loss.item() / max(n_labels, 1)
        dt = time.perf_counter() - t0
        train_time += dt
        tokens += inputs.numel() * ranks.world
        done = step + 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {done}; lower the lr (now {config.lr})")
        if done % config.log_every == 0 or done == config.steps:
            log(
                {
                    "step": done,
                    "split": "train",
                    "loss": loss,
                    "lr": lr,
                    "tokens_per_s": inputs.numel() * ranks.world / dt,
                }
            )
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            evaluate(done)
        if (
            out_dir is not None
            and config.checkpoint_every
            and done % config.checkpoint_every == 0
            and done != config.steps
        ):
            if ranks.rank == 0:
                save_checkpoint(out_dir, raw_model, optimizer, done, generator)
            if ranks.world > 1:
                dist.barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(train_time, 1e-9):,.0f}", refresh=False)
    if bar is not None:
        bar.close()
    finished = end == config.steps
    if finished:
        last = history[-1] if history else {}
        metrics = last if last.get("split") == "val" and last.get("step") == end else evaluate(end)
    final = {k: v for k, v in metrics.items() if k not in ("step", "split")} if finished else {}
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = max(0, _max_rss_bytes() - rss_start), "cpu_max_rss_delta"
    result = TrainResult(
        history=history,
        final=final,
        wall_s=time.perf_counter() - t_start,
        tokens_per_s=tokens / max(train_time, 1e-9),
        peak_memory_bytes=int(peak),
        peak_memory_kind=kind,
        steps=end,
        num_parameters=sum(p.numel() for p in raw_model.parameters()),
    )
    if writer:
        save_checkpoint(out_dir, raw_model, optimizer, end, generator)
    if writer and finished:
        raw_model.save(out_dir)
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        summary.update(
            train_config=asdict(config),
            task=task.describe(),
            task_options=task.options,
            world_size=ranks.world,
        )
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if ranks.world > 1:
        dist.barrier()
    if ranks.owns_group:
        dist.destroy_process_group()
    return result
