"""Softmax top-k router, the baseline: probabilities softmax(W x), each token keeps its k largest
(Outrageously Large Neural Networks, Shazeer et al., 2017; Switch Transformers, Fedus et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ._router import Router, RouterConfig, register_router, top_k_weights


@dataclass
class TopKConfig(RouterConfig):
    normalize: bool = (
        True  # renormalise the k kept probabilities to sum to 1 (False: Switch's raw top-1 prob)
    )
    z_weight: float = 0.0  # router z-loss weight, mean logsumexp(logits)^2 (ST-MoE, Zoph et al., 2022)

    def __post_init__(self):
        super().__post_init__()
        if self.z_weight < 0:
            raise ValueError(f"topk: z_weight must be >= 0, got {self.z_weight}")


class TopKRouter(Router):
    def __init__(self, config: TopKConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.d_model, config.n_experts, bias=False)

    def route(self, x):
        logits = self.proj(x).float()  # (N, E): the softmax in fp32 under autocast
        probs = logits.softmax(-1)
        aux = {}
        if self.config.z_weight > 0:
            aux["z"] = self.config.z_weight * torch.logsumexp(logits, -1).pow(2).mean()
        return probs, top_k_weights(probs, self.config.k, self.config.normalize), aux


register_router(
    "topk",
    TopKConfig,
    TopKRouter,
    paper="Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer (Shazeer et al., 2017)",
    notes="MoE router (the baseline): softmax top-k, Switch load-balance loss, optional z-loss",
)
