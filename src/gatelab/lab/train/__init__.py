"""The trainer: AdamW with parameter groups (own learning rates, frozen parameters), warmup + cosine,
gradient clipping, extra loss terms, bf16 autocast on CUDA, JSONL metrics, checkpoints without pickles and
exact resume of the same run only; one process, or DDP or FSDP2 under torchrun (gloo on CPU, NCCL on GPU)
(Decoupled Weight Decay Regularization, Loshchilov et al., 2019).

config.py: TrainConfig, the schedule and the run's spec; groups.py: parameter groups and extra terms;
runtime.py: DDP ranks and the memory check; checkpoint.py: the run folder's files; loop.py: train();
routing.py: Gradient Routing's gate pass for Feature-Selection Gates (train's pre_step); sharding.py: FSDP2
and the full states its checkpoints hold.
"""

from .checkpoint import CHECKPOINT, load_checkpoint, read_metrics, save_checkpoint
from .config import RESUMABLE, TrainConfig, TrainResult, check_device, lr_at, run_spec
from .groups import default_terms, optimizer_groups, param_groups
from .loop import train
from .runtime import check_memory, estimate_memory_bytes

__all__ = [
    "CHECKPOINT",
    "RESUMABLE",
    "TrainConfig",
    "TrainResult",
    "check_device",
    "check_memory",
    "default_terms",
    "estimate_memory_bytes",
    "load_checkpoint",
    "lr_at",
    "optimizer_groups",
    "param_groups",
    "read_metrics",
    "run_spec",
    "save_checkpoint",
    "train",
]
