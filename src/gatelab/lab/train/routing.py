"""Gradient Routing for Feature-Selection Gates (Feature Selection Gates with Gradient Routing for
Endoscopic Image Computing, Roffo et al., 2024), as a hook of the one trainer: two passes over each batch.

    pass 0 (the hook, before the trainer's step):  loss.backward(); gate optimizer steps the gates only
    pass 1 (the trainer's own step):               loss.backward(); main optimizer steps everything else

Official code (``runners/trainer.py``, ``build_configuration.py``): the gate parameters get their own
optimizer at a tiny learning rate (about 1e-6) and stay out of the main optimizer; the gradients are zeroed
once before both passes, so the backbone's step sees the gradients of both. Here the main optimizer's
``zero_grad`` after its step clears the backbone, and the hook clears the gates before its pass: the same
arithmetic. The gate optimizer runs at a constant learning rate and is not checkpointed (no resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from gatelab.gates.vision import FeatureSelectionGate

from .config import TrainConfig
from .groups import param_groups

GATE_LR = 1e-6  # the official configuration's learning rate of the gate optimizer


class GradientRouting:
    """The gate pass of Gradient Routing over ``model``'s Feature-Selection Gates.

    ``routing = GradientRouting(model)``; ``train(model, task, config, groups=routing.main_groups(config),
    pre_step=routing)``. ``routing(loss_fn)`` runs pass 0: ``loss_fn()`` (the batch's task loss, a scalar
    tensor) backward, then one step of the gate optimizer."""

    def __init__(self, model: nn.Module, gate_lr: float = GATE_LR):
        if (
            not isinstance(gate_lr, int | float)
            or isinstance(gate_lr, bool)
            or not math.isfinite(gate_lr)
            or gate_lr <= 0
        ):
            raise ValueError(f"gate_lr must be a finite number > 0, got {gate_lr!r}")
        self.gate_params = [
            p for m in model.modules() if isinstance(m, FeatureSelectionGate) for p in m.parameters()
        ]
        if not self.gate_params:
            raise ValueError("gradient routing needs a model with Feature-Selection Gates; this one has none")
        self.gate_lr = gate_lr
        self.optimizer = torch.optim.AdamW(self.gate_params, lr=gate_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.model = model

    def main_groups(self, config: TrainConfig) -> list[dict]:
        """The main optimizer's groups for ``train(groups=...)``: the default split (weight decay on
        matrices only) at config.lr, without the gates."""
        gates = {id(p) for p in self.gate_params}
        groups = [
            {
                "params": [p for p in g["params"] if id(p) not in gates],
                "weight_decay": g["weight_decay"],
                "lr": config.lr,
            }
            for g in param_groups(self.model, config.weight_decay)
        ]
        return [g for g in groups if g["params"]]

    def __call__(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)  # the gates' gradients of the last pass 1
        loss = loss_fn()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def routing_options(model: nn.Module, config: TrainConfig) -> dict:
    """The trainer's keyword arguments for ``model``: a model whose ``gradient_routing_lr`` is a number
    trains with Gradient Routing ({"groups": ..., "pre_step": ...}); any other model, none ({})."""
    gate_lr = getattr(model, "gradient_routing_lr", None)
    if gate_lr is None:
        return {}
    routing = GradientRouting(model, gate_lr)
    return {"groups": routing.main_groups(config), "pre_step": routing}
