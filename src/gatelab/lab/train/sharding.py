"""FSDP2 for the trainer: ``fully_shard`` on every block, then on the root (which keeps the embedding, the
tied head and the final norm in its own group), and the full (unsharded) model and optimizer states that
the checkpoint files hold, gathered to rank 0 and scattered back on resume (PyTorch FSDP2,
torch.distributed.fsdp.fully_shard; Zhao et al., 2023, arXiv:2304.11277)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Sharded:
    """``model`` sharded in place over ``world`` ranks with FSDP2; ``groups`` (optimizer_groups of the
    unsharded model) rebuilt on its sharded parameters, by name.

    Each rank keeps 1 / world of every parameter, gradient and AdamW moment; a block's forward and backward
    all-gather its parameters, and the backward reduce-scatters the gradients, averaged over ranks as DDP
    averages them. Rank 0 (``keep_copy``) keeps a full CPU copy of the model to write the run folder's files
    with the model's own ``save``; the files are those of one process."""

    def __init__(
        self, model: nn.Module, groups: list[dict], device: torch.device, world: int, keep_copy: bool
    ):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(
                f"parallel='fsdp' shards a model's blocks (an nn.ModuleList named 'blocks'); "
                f"{type(model).__name__} has none"
            )
        names = {}  # id(parameter) -> every name it has (tied weights have two)
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.names = [names[id(p)] for g in groups for p in g["params"]]  # optimizer order
        group_names = [[names[id(p)][0] for p in g["params"]] for g in groups]
        # a tied weight's other names, e.g. "head.weight" -> "embed.weight"
        self.aliases = {alias: n[0] for n in names.values() for alias in n[1:]}
        self.copy = copy.deepcopy(model).cpu() if keep_copy else None
        mesh = init_device_mesh(device.type, (world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embedding, tied head, final norm
        self.model = model
        params = dict(model.named_parameters())
        self.groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names)]

    def full_model(self) -> nn.Module | None:
        """The model with every rank's shards gathered (collective: every rank calls it): the CPU copy on
        rank 0, None elsewhere."""
        tensors = get_model_state_dict(self.model, options=FULL)
        if self.copy is None:
            return None
        self.copy.load_tensors(tensors)
        return self.copy

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's full state_dict in the form of one process's (parameters by index in group
        order), on rank 0; None elsewhere. Collective."""
        state = get_optimizer_state_dict(self.model, optimizer, options=FULL)
        if self.copy is None:
            return None
        index = {name: i for i, names in enumerate(self.names) for name in names}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
        return {"state": {index[n]: entry for n, entry in state["state"].items()}, "param_groups": groups}

    def load(self, optimizer: torch.optim.Optimizer, tensors: dict, optimizer_state: dict) -> None:
        """Scatter the full ``tensors`` (model.safetensors) and ``optimizer_state`` (one process's
        state_dict) into this rank's shards; every rank passes the same full states."""
        tensors = {**tensors, **{a: tensors[n] for a, n in self.aliases.items() if n in tensors}}
        set_model_state_dict(self.model, tensors, options=StateDictOptions(full_state_dict=True))
        name = [names[0] for names in self.names]
        state = {
            "state": {name[int(i)]: entry for i, entry in optimizer_state["state"].items()},
            "param_groups": [
                {**g, "params": [name[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def sharded_term(name: str, fn, model: nn.Module):
    """The extra loss ``fn(model)`` of the sharded model; a term that reads the parameters outside the
    forward (only the forward sees them whole; elsewhere they are DTensor shards) is refused, naming it."""
    hint = (
        f"extra loss {name!r} reads the model's parameters outside its forward, where FSDP2 holds only their "
        "shards: train this model with parallel='ddp'"
    )
    try:
        value = fn(model)
    except (RuntimeError, NotImplementedError) as error:  # e.g. a DTensor shard times a plain tensor
        raise ValueError(f"{hint} ({type(error).__name__}: {error})") from error
    if isinstance(value, DTensor):
        raise ValueError(hint)
    return value
