"""Activation dense-to-sparse gate: G(x) = softmax(act(W x + b) / tau) with tau annealed from dense to sparse
(Is Temperature Sample Efficient for Softmax Gaussian Mixture of Experts?, Nguyen, Akbarian and Ho, ICML
2024, arXiv 2401.13875).

Read from the abstract only (no code was found): "routes the output of a linear layer to an activation
function before delivering them to the softmax". Our reading, to be checked against the paper: the
temperature divides the activation's output; the default activation is tanh (bounded, so the scores stay in
[-1/tau, 1/tau] and a high tau is dense); ``activation="identity"`` is the plain dense-to-sparse gate
softmax((W x + b) / tau). The anneal is geometric from ``tau_start`` to ``tau_end`` over ``anneal_steps``
training forwards (counted in a buffer saved with the model). Sparsity comes, as in the dense-to-sparse
gate of Nie et al. (2021), from dropping the experts whose weight is below ``prune_below`` (the largest one
always stays) and renormalising; ``k`` (None: no cap) optionally keeps at most k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.common.checks import check_choice

from ._router import Router, RouterConfig, register_router, top_k_weights

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "identity": lambda t: t}


@dataclass
class DenseToSparseConfig(RouterConfig):
    k: int | None = None  # no fixed number of experts: the temperature decides
    needs_k: ClassVar[bool] = False
    activation: str = "tanh"
    tau_start: float = 2.0
    tau_end: float = 0.1
    anneal_steps: int = 1000
    prune_below: float = 0.01  # weights below this are dropped (0: dense)

    def __post_init__(self):
        super().__post_init__()
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(
                f"dense_to_sparse: temperatures must satisfy 0 < tau_end <= tau_start, got tau_start="
                f"{self.tau_start}, tau_end={self.tau_end}"
            )
        if self.anneal_steps < 1:
            raise ValueError(f"dense_to_sparse: anneal_steps must be a positive int, got {self.anneal_steps}")
        if not 0 <= self.prune_below < 1:
            raise ValueError(f"dense_to_sparse: prune_below must be in [0, 1), got {self.prune_below}")


class DenseToSparseRouter(Router):
    def __init__(self, config: DenseToSparseConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.d_model, config.n_experts)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards so far

    def temperature(self, step: int | None = None) -> float:
        """tau at ``step`` (default: the forwards trained so far): geometric from tau_start to tau_end."""
        c = self.config
        step = int(self.steps) if step is None else step
        progress = min(max(step, 0), c.anneal_steps) / c.anneal_steps
        return c.tau_start * (c.tau_end / c.tau_start) ** progress

    def route(self, x):
        c = self.config
        tau = self.temperature()
        if self.training:
            self.steps += 1
        probs = (ACTIVATIONS[c.activation](self.proj(x).float()) / tau).softmax(-1)  # (N, E)
        keep = (probs >= c.prune_below) | (probs == probs.amax(-1, keepdim=True))
        weights = probs * keep
        weights = top_k_weights(weights, c.k, normalize=False) if c.k is not None else weights
        return probs, weights / weights.sum(-1, keepdim=True), {}


register_router(
    "dense_to_sparse",
    DenseToSparseConfig,
    DenseToSparseRouter,
    paper="Is Temperature Sample Efficient for Softmax Gaussian Mixture of Experts? (Nguyen et al., 2024)",
    notes="MoE router: softmax(act(Wx + b) / tau), tau annealed, small weights pruned; from the abstract "
    "only: where tau sits, the activation and the pruning rule are our reading",
    status="experimental",
)
