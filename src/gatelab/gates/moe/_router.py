"""What every MoE router shares: the config base, the output, capacity and the load-balance loss.

    out = router(x)        # x (N, d_model) tokens -> RouterOutput
    out.weights            # (N, E) combine weights, zero for experts a token does not use
    out.aux                # name -> weighted scalar loss ("balance", and a router's own, e.g. "entropy")
    out.stats              # expert load, active-expert fraction, dropped assignments (floats, detached)

A router computes its dense probabilities and its weights (``route``); the base class checks the input,
applies the capacity (``capacity_factor``: each expert takes at most ``ceil(factor * assignments / E)``
assignments of a call, earlier tokens first; the rest are dropped and counted), and adds the load-balance
loss of Switch Transformers (Fedus et al., 2021), ``E * sum_e f_e P_e`` with f_e the share of assignments
to expert e and P_e its mean probability (1 when both are uniform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gatelab.mixers._base import check_fields
from gatelab.registry import MechanismSpec, mechanism_key, register

ROLE = "moe_router"  # MechanismSpec.extra["role"] of every router (family "gate")


@dataclass
class RouterConfig:
    d_model: int = 64
    n_experts: int = 4
    k: int | None = 2  # experts per token (a router's own meaning; None: no fixed number)
    balance_weight: float = 0.01  # weight of the load-balance loss (0: none)
    capacity_factor: float | None = None  # None: no capacity, no token is dropped
    needs_k: ClassVar[bool] = True  # False where k=None (no fixed number of experts) is a valid choice

    def __post_init__(self):
        check_fields(self)
        key = mechanism_key(type(self))
        if self.k is None and self.needs_k:
            raise ValueError(f"{key}: k must be an int in [1, n_experts], got None")
        if self.d_model < 1:
            raise ValueError(f"{key}: d_model must be a positive int, got {self.d_model}")
        if self.n_experts < 1:
            raise ValueError(f"{key}: n_experts must be a positive int, got {self.n_experts}")
        if self.k is not None and not 1 <= self.k <= self.n_experts:
            raise ValueError(
                f"{key}: k must be in [1, n_experts={self.n_experts}] (experts per token), got {self.k}"
            )
        if self.balance_weight < 0:
            raise ValueError(f"{key}: balance_weight must be >= 0, got {self.balance_weight}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"{key}: capacity_factor must be > 0 or None, got {self.capacity_factor}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RouterOutput:
    """weights (N, E) combine weights (rows sum to 1 unless assignments were dropped); probs (N, E) the
    router's dense probabilities; mask (N, E) bool, the (token, expert) assignments kept; aux: name ->
    weighted scalar loss; stats: name -> float."""

    weights: torch.Tensor
    probs: torch.Tensor
    mask: torch.Tensor
    aux: dict
    stats: dict

    @property
    def aux_loss(self) -> torch.Tensor:
        return sum(self.aux.values(), torch.zeros((), device=self.weights.device))


def top_k_weights(probs: torch.Tensor, k: int, normalize: bool) -> torch.Tensor:
    """probs (N, E) -> (N, E) with all but each row's k largest set to 0 (renormalised if ``normalize``)."""
    values, indices = probs.topk(k, dim=-1)
    if normalize:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, values)


def load_stats(mask: torch.Tensor) -> dict:
    """Expert load of the assignments ``mask`` (N, E): max / mean load, coefficient of variation, and the
    mean fraction of experts a token uses."""
    load = mask.sum(0).double()  # (E,) assignments per expert
    mean = load.mean().clamp_min(1e-12)
    return {
        "load_max_over_mean": float(load.max() / mean),
        "load_cv": float(load.std(correction=0) / mean),
        "active_fraction": float(mask.double().mean()),
    }


class Router(nn.Module):
    """Base class: subclasses set ``self.config`` and implement ``route(x) -> (probs, weights, aux)``."""

    config: RouterConfig

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> RouterOutput:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{mechanism_key(type(self))}: router input must be a float tensor (N, d_model), "
                f"got {type(x).__name__}"
            )
        if x.ndim != 2 or x.shape[1] != self.config.d_model:
            raise ValueError(
                f"{mechanism_key(type(self))}: router input must be (N, d_model={self.config.d_model}) "
                f"tokens, got {tuple(x.shape)}"
            )
        probs, weights, aux = self.route(x)
        mask = weights > 0
        stats = {"assignments_per_token": float(mask.sum(-1).double().mean())} if len(x) else {}
        c = self.config
        if c.balance_weight > 0:
            share = mask.sum(0).to(probs.dtype) / mask.sum().clamp_min(1)  # f_e: not differentiable
            aux = {"balance": c.balance_weight * c.n_experts * (share * probs.mean(0)).sum(), **aux}
        if c.capacity_factor is not None and len(x):
            capacity = math.ceil(c.capacity_factor * int(mask.sum()) / c.n_experts)
            kept = mask & (mask.cumsum(0) <= capacity)  # earlier tokens first, per expert
            stats["dropped_fraction"] = float((mask & ~kept).sum() / mask.sum().clamp_min(1))
            stats["tokens_dropped"] = float((mask.any(-1) & ~kept.any(-1)).double().mean())
            weights, mask = weights * kept, kept
        if len(x):
            stats.update(load_stats(mask))
        return RouterOutput(weights, probs, mask, aux, stats)


def expert_linear(n_experts: int, d_in: int, d_out: int) -> nn.Parameter:
    """One weight (E, d_in, d_out) for E small linear maps, drawn like nn.Linear's default init."""
    weight = torch.empty(n_experts, d_in, d_out)
    bound = 1 / math.sqrt(d_in)
    return nn.Parameter(nn.init.uniform_(weight, -bound, bound))


def register_router(key: str, config_cls: type, module_cls: type, paper: str, notes: str, **fields) -> None:
    """Register an MoE router: family "gate" (the sequence-mixer drivers skip it), never offered as a
    decoder mixer (causal=False), ``extra["role"] == ROLE`` (how :func:`router_keys` finds it)."""
    register(
        MechanismSpec(
            key,
            "gate",
            config_cls,
            module_cls,
            paper,
            causal=False,
            notes=notes,
            extra={"role": ROLE},
            **fields,
        )
    )
