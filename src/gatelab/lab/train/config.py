"""What a training run is: its :class:`TrainConfig` (validated), the learning-rate schedule, the result, and
the run's spec, which a checkpoint records so that a resume continues the same run and nothing else."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import torch

PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """How a model is trained. ``parallel`` says how the ranks of a torchrun launch (WORLD_SIZE > 1) share
    the model: "ddp" (a full replica on each, gradients all-reduced) or "fsdp" (FSDP2: parameters,
    gradients and optimizer states sharded over the ranks); with one process both train the plain model."""

    steps: int = 1000
    batch_size: int = 32  # global batch (split across DDP ranks)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1  # on matrices only; not on norms, biases, embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # 0: no evaluation at all (final metrics stay empty)
    eval_batch_size: int | None = None  # None: batch_size
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "mps"; checked against this machine
    out_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when out_dir is given)
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in out_dir (refused without this or resume)
    progress: bool = True
    compile: bool = False
    autocast: bool = True  # bf16 autocast on CUDA (False: fp32 everywhere); no effect on CPU
    log_every: int = 1  # a train row in history / metrics.jsonl every N steps
    stop_after: int | None = (
        None  # stop after this many steps (checkpointed), as if interrupted; resume later
    )
    # stop early when an evaluation's validation accuracy reaches this (Zoology's protocol: 0.99); the run
    # then counts as finished (model and summary written); None: train every step
    early_stop: float | None = None
    parallel: str = "ddp"  # "ddp" | "fsdp" under torchrun; the checkpoint files are the same for both

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup", "eval_every", "eval_batches", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            # NaN passes every comparison below (a NaN grad_clip silently disabled clipping): check first
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}"
            )
        if self.eval_batch_size is not None and (
            not isinstance(self.eval_batch_size, int) or isinstance(self.eval_batch_size, bool)
            or self.eval_batch_size < 1
        ):  # fmt: skip
            raise ValueError(f"eval_batch_size must be a positive int or None, got {self.eval_batch_size!r}")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ValueError(f"stop_after must be a positive int or None, got {self.stop_after!r}")
        if self.early_stop is not None:
            value = self.early_stop
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"early_stop must be an accuracy in (0, 1] or None, got {value!r}")
            if not self.eval_batches or not self.eval_every:
                raise ValueError(
                    f"early_stop={value} needs evaluations during training: eval_batches and eval_every "
                    f"must be > 0, got {self.eval_batches} and {self.eval_every}"
                )
        if self.parallel not in PARALLEL:
            raise ValueError(
                f"parallel must be one of {', '.join(map(repr, PARALLEL))}, got {self.parallel!r}"
            )
        if self.resume and self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume=True continues the run in out_dir, overwrite=True replaces it: choose one"
            )
        check_device(self.device)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying what this machine offers."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use device 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine; use device 'cpu'")
    elif parsed.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return parsed


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # train rows {step, loss, lr, tokens_per_s}; eval rows
    final: dict = field(default_factory=dict)  # final eval metrics
    wall_s: float = 0.0
    tokens_per_s: float = 0.0  # tokens fed per second of training (all ranks), excluding eval
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""  # "cuda_max_allocated" or "cpu_max_rss_delta"
    steps: int = 0  # steps trained (fewer than config.steps after an early stop)
    num_parameters: int = 0
    stopped_early: bool = False  # an evaluation reached config.early_stop


def lr_at(step: int, config: TrainConfig, peak: float | None = None) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` (default config.lr) to
    peak * min_lr_ratio at ``steps``. A parameter group with its own learning rate passes it as ``peak``:
    the same shape of schedule, scaled."""
    peak = config.lr if peak is None else peak
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


# Fields a resume may change: where and how this process runs and when it stops or checkpoints, not what
# is trained, on what, or what is logged. The device, torch.compile and DDP / FSDP are among them (a run may
# move to another machine); the resume is bit-exact only on the same device and parallel mode without compile.
RESUMABLE = (
    "out_dir",
    "resume",
    "overwrite",
    "progress",
    "stop_after",
    "checkpoint_every",
    "device",
    "compile",
    "parallel",
)


def run_spec(model, task, config: TrainConfig, groups: list[dict], extra_losses: dict) -> dict:
    """What identifies a run: the training settings (all but RESUMABLE), the task as it describes itself
    (for text: the corpus and its sha256), the model's config (all but its init seed: the checkpoint holds
    the weights), the parameter groups and the names of the extra loss terms; JSON values."""
    model_config = getattr(model, "config", None)
    model_config = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    train = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUMABLE}
    if train["early_stop"] is None:  # recorded only when set: checkpoints from before the option resume
        del train["early_stop"]
    spec = {
        "train": train,
        "task": task.describe(),
        "model": {"class": type(model).__name__, **{k: v for k, v in model_config.items() if k != "seed"}},
        "groups": [
            {
                "parameters": len(g["params"]),
                "elements": sum(p.numel() for p in g["params"]),
                "peak_lr": g["peak_lr"],
                "weight_decay": g["weight_decay"],
            }
            for g in groups
        ],  # fmt: skip
        "extra_losses": sorted(extra_losses),
    }
    return json.loads(json.dumps(spec, default=str))


def spec_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: recorded -> current' for every leaf that differs (dotted names)."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        a, b = recorded.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out
