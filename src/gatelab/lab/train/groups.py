"""What the trainer updates and minimises besides cross-entropy: AdamW parameter groups (weight decay on
matrices only, or groups a caller gives with their own learning rates; frozen parameters left out) and
extra loss terms (the attention gates' eviction-rate loss by default on a gated model)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from .config import TrainConfig

GROUP_KEYS = {"params", "lr", "weight_decay"}
ROW_KEYS = {"step", "split", "loss", "lr", "tokens_per_s"}  # what a train row holds besides extra terms


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear-like layers: no decay on norms, biases, embeddings (GPT-2, nanoGPT)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(model: nn.Module, config: TrainConfig, groups: list[dict] | None = None) -> list[dict]:
    """AdamW parameter groups, each with its ``peak_lr`` (the schedule's top for that group).

    ``groups`` None: :func:`param_groups` at config.lr and config.weight_decay. Otherwise a list of
    {"params": parameters of ``model``, "lr": the group's peak learning rate (default config.lr),
    "weight_decay": (default config.weight_decay)}; parameters with requires_grad=False are left out
    (frozen), a parameter in two groups or outside the model is an error, empty groups are dropped.
    """
    if groups is None:
        return [{**g, "peak_lr": config.lr} for g in param_groups(model, config.weight_decay)]
    if not isinstance(groups, list | tuple) or not all(isinstance(g, dict) for g in groups):
        raise TypeError(f"groups must be a list of dicts {{'params': [...], 'lr': ...}}, got {groups!r}")
    owned = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    out = []
    for i, group in enumerate(groups):
        unknown = set(group) - GROUP_KEYS
        if unknown or "params" not in group:
            raise ValueError(
                f"groups[{i}] takes the keys {sorted(GROUP_KEYS)} ('params' required), got {sorted(group)}"
            )
        params = list(group["params"])
        for p in params:
            if not isinstance(p, nn.Parameter) or id(p) not in owned:
                raise ValueError(f"groups[{i}] holds a tensor that is not a parameter of the model")
            if id(p) in seen:
                raise ValueError(f"groups[{i}] repeats a parameter of an earlier group")
            seen.add(id(p))
        peak, decay = group.get("lr", config.lr), group.get("weight_decay", config.weight_decay)
        for name, value in (("lr", peak), ("weight_decay", decay)):
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"groups[{i}]['{name}'] must be a finite number >= 0, got {value!r}")
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "weight_decay": decay, "peak_lr": peak})
    if not out:
        raise ValueError(
            "groups leave nothing to train: every parameter given is frozen (requires_grad=False)"
        )
    return out


def default_terms(model: nn.Module) -> tuple[dict, dict]:
    """(extra losses, monitors) a model brings: with attention gates (KV-cache eviction) their
    eviction-rate loss ("eviction") and the kept fraction of the last forward ("kept"); with MoE MLPs their
    auxiliary losses ("moe_aux": load balance and the routers' own) and the last forward's expert load
    (max / mean) and active-expert fraction; with learned Flux routers their sparsity budget ("flux_budget")
    and the fraction of layers on the sparse side ("sparse_layers"); with LycheeDecode layers their L0
    Lagrangian ("lychee_l0"); none otherwise."""
    from gatelab.cache import AttentionGatePolicy, eviction_loss, kept_fraction
    from gatelab.gates.moe import moe_aux_loss, moe_layers, moe_stats
    from gatelab.routers.flux import budget_loss, flux_layers, sparse_fraction
    from gatelab.routers.lychee import lychee_l0_loss, lychee_layers

    losses, monitors = {}, {}
    if any(isinstance(m, AttentionGatePolicy) for m in model.modules()):
        losses["eviction"], monitors["kept"] = eviction_loss, kept_fraction
    if moe_layers(model):
        losses["moe_aux"] = moe_aux_loss
        monitors["expert_load"] = lambda m: moe_stats(m).get("load_max_over_mean")
        monitors["active_experts"] = lambda m: moe_stats(m).get("active_fraction")
    if any(layer.config.route == "learned" for layer in flux_layers(model)):
        losses["flux_budget"] = budget_loss
        monitors["sparse_layers"] = lambda m: float(sparse_fraction(m).detach().mean())
    if lychee_layers(model):
        losses["lychee_l0"] = lychee_l0_loss
    return losses, monitors


def check_terms(terms: dict, what: str) -> dict[str, Callable]:
    """``terms`` (name -> callable(model)) checked: string names that no train row already uses."""
    if not isinstance(terms, dict) or not all(isinstance(k, str) and callable(f) for k, f in terms.items()):
        raise TypeError(f"{what} must map names to callables taking the model, got {terms!r}")
    clash = ROW_KEYS & set(terms)
    if clash:
        raise ValueError(f"{what}: the names {sorted(clash)} are taken by the train rows; choose others")
    return dict(terms)


def term_value(name: str, value) -> torch.Tensor | float:
    """An extra loss term's value: a scalar tensor (it is differentiated) or a plain number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"extra loss {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        return value.reshape(())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"extra loss {name!r} must return a scalar tensor or a number, got {type(value).__name__}"
    )
