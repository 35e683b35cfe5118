"""AW-MoE's attention-weighted gate: a gate unit and a DIN-style activation unit give each expert a weight
(Attention Weighted Mixture of Experts with Contrastive Learning for Personalized Ranking in E-commerce,
Gong et al., 2023, arXiv 2306.05011).

Read from the abstract only (no code or equations were found): in the paper the gate sees the user's
behaviour sequence, and "one gate unit and one activation unit" learn "the fine-grained activation vector
for experts using an attention mechanism". Our per-token reading for an LM's MLP slot (the token already
carries its context from the mixer before it):

- gate unit: probabilities softmax(W_g x) over the E experts;
- activation unit (DIN's: an MLP on [x, q_e, x * q_e] for a learned query q_e per expert): a_e in (0, 1),
  a_e = sigmoid(w2 . relu(W1 [x, q_e, x * q_e] + b1) + b2);
- weights: the top k of softmax(W_g x) * a, renormalised to sum to 1.

With a constant activation (w2 = 0) it is the softmax top-k router. The paper's random masking of the
behaviour sequence and its contrastive loss on the gate output are training procedure, left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ._router import Router, RouterConfig, register_router, top_k_weights


@dataclass
class AWMoEConfig(RouterConfig):
    attention_hidden: int = 16  # hidden width of the activation unit's MLP

    def __post_init__(self):
        super().__post_init__()
        if self.attention_hidden < 1:
            raise ValueError(f"aw_moe: attention_hidden must be a positive int, got {self.attention_hidden}")


class AWMoERouter(Router):
    def __init__(self, config: AWMoEConfig):
        super().__init__()
        self.config = config
        d, E, h = config.d_model, config.n_experts, config.attention_hidden
        self.gate = nn.Linear(d, E, bias=False)
        self.queries = nn.Parameter(torch.randn(E, d) / d**0.5)  # q_e, one per expert
        self.hidden = nn.Linear(3 * d, h)
        self.out = nn.Linear(h, 1)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> a (N, E) in (0, 1): the activation unit's weight of each expert."""
        N, E = x.shape[0], self.config.n_experts
        xe = x[:, None].expand(N, E, x.shape[1])  # (N, E, d)
        qe = self.queries[None].expand_as(xe)
        features = torch.cat([xe, qe, xe * qe], dim=-1)  # (N, E, 3d)
        return torch.sigmoid(self.out(torch.relu(self.hidden(features)))).squeeze(-1).float()

    def route(self, x):
        probs = self.gate(x).float().softmax(-1)  # (N, E)
        weighted = probs * self.activation(x)
        weighted = weighted / weighted.sum(-1, keepdim=True)
        return weighted, top_k_weights(weighted, self.config.k, normalize=True), {}


register_router(
    "aw_moe",
    AWMoEConfig,
    AWMoERouter,
    paper="Attention Weighted Mixture of Experts with Contrastive Learning for Personalized Ranking in "
    "E-commerce (Gong et al., 2023)",
    notes="MoE router: gate unit x DIN-style activation unit per expert, top-k; from the abstract only: "
    "a per-token reading (no behaviour sequence), masking and contrastive loss left out",
    status="experimental",
)
