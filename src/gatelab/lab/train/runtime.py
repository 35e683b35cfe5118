"""Where a run executes: the DDP ranks torchrun describes, and the memory one step needs (checked before
anything is allocated)."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


def max_rss_bytes() -> int:
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
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str) -> Ranks:
        """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world <= 1:
            return cls()
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
