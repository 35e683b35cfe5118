"""COMET: k soft decision trees with smooth-step nodes choose at most k experts (COMET: Learning Cardinality
Constrained Mixture of Experts with Trees and Local Search, Ibrahim et al., KDD 2023).

Follows the authors' PyTorch code (mazumder-lab/COMET-BERT, ``cometbert/gates/comet.py``):

- each of the k trees has E leaves (one per expert) and E - 1 internal nodes in heap order (children of node
  i are 2i + 1 and 2i + 2); leaves are numbered left-first, so with E a power of two the trees are complete
  of depth log2 E;
- node i of tree j goes left with p = S_gamma(w_ij . x) (no bias), the smooth-step
  S(t) = 0 for t <= -gamma/2, 1 for t >= gamma/2, else -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2;
- leaf e of tree j scores s_je = a_je . x + b_je + log P_j(reach e), -inf where P < 1e-5;
- one softmax over all k * E scores, summed per expert over the trees and renormalised;
- the entropy regulariser ``entropy_weight * mean_tokens sum_trees H(P_j(leaf))`` pushes every tree to one
  leaf: once the nodes saturate (p in {0, 1}) each tree reaches one leaf and at most k experts are used.

Not implemented: the permutation local search (``comet_permuted_gate.py``, optional in the paper); the
code's identity permutation is what runs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ._router import Router, RouterConfig, register_router

REACH_FLOOR = 1e-5  # leaves reached with a lower probability are cut (the code's threshold)
EPSILON = 1e-6


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The cubic smooth-step: 0 below -gamma/2, 1 above gamma/2, C^1 in between (gradient only there)."""
    cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic))


def leaf_paths(n_experts: int) -> torch.Tensor:
    """(E leaves, E - 1 nodes) in {+1: goes left, -1: goes right, 0: off the path}, leaves left-first."""
    paths = []

    def visit(node: int, path: dict) -> None:
        if node >= n_experts - 1:
            row = torch.zeros(max(n_experts - 1, 0))
            for i, direction in path.items():
                row[i] = direction
            paths.append(row)
            return
        visit(2 * node + 1, {**path, node: 1.0})
        visit(2 * node + 2, {**path, node: -1.0})

    visit(0, {})
    return torch.stack(paths)


@dataclass
class CometConfig(RouterConfig):
    gamma: float = 1.0  # width of the smooth-step's polynomial band
    entropy_weight: float = 1e-3  # the paper's entropy regulariser on the trees' leaf probabilities

    def __post_init__(self):
        super().__post_init__()
        if self.gamma <= 0:
            raise ValueError(f"comet: gamma must be > 0, got {self.gamma}")
        if self.entropy_weight < 0:
            raise ValueError(f"comet: entropy_weight must be >= 0, got {self.entropy_weight}")


class CometRouter(Router):
    def __init__(self, config: CometConfig):
        super().__init__()
        self.config = config
        E, k, d = config.n_experts, config.k, config.d_model
        # the code's init: node hyperplanes U(-gamma/100, gamma/100) (every node starts in the band), leaves
        # U(-0.05, 0.05) with zero bias
        self.nodes = nn.Parameter(torch.empty(E - 1, k, d).uniform_(-config.gamma / 100, config.gamma / 100))
        self.leaf_weight = nn.Parameter(torch.empty(E, k, d).uniform_(-0.05, 0.05))
        self.leaf_bias = nn.Parameter(torch.zeros(E, k))
        self.register_buffer("paths", leaf_paths(E), persistent=False)  # (E, E - 1)

    def reach(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> P (N, E, k): probability that tree j reaches leaf e."""
        p = smooth_step(torch.einsum("nd,ikd->nik", x.float(), self.nodes.float()), self.config.gamma)
        left, right = (self.paths > 0).float(), (self.paths < 0).float()  # (E, E - 1)
        off = 1 - left - right
        # per leaf, the product over its path's nodes of p (left) or 1 - p (right); 1 off the path
        factors = left[None, :, :, None] * p[:, None] + right[None, :, :, None] * (1 - p[:, None])
        return (factors + off[None, :, :, None]).prod(2)  # (N, E, E - 1, k) -> (N, E, k)

    def route(self, x):
        N, E, k = x.shape[0], self.config.n_experts, self.config.k
        reach = self.reach(x)  # (N, E, k)
        scores = torch.einsum("nd,ekd->nek", x.float(), self.leaf_weight.float()) + self.leaf_bias.float()
        log_reach = torch.where(reach < REACH_FLOOR, float("-inf"), torch.log(reach + EPSILON))
        s = (scores + log_reach).transpose(1, 2).reshape(N, k * E)  # (N, k * E)
        w = s.softmax(-1).reshape(N, k, E).sum(1)  # (N, E): summed over the trees
        w = w / w.sum(-1, keepdim=True)
        aux = {}
        if self.config.entropy_weight > 0:
            plogp = reach * torch.log(reach.clamp_min(EPSILON))
            aux["entropy"] = self.config.entropy_weight * -plogp.sum((1, 2)).mean()
        # the dense probabilities (for the balance loss) are the weights: COMET's sparsity is in them
        return w, w, aux


register_router(
    "comet",
    CometConfig,
    CometRouter,
    paper="COMET: Learning Cardinality Constrained Mixture of Experts with Trees and Local Search (Ibrahim et al., 2023)",
    notes="MoE router: k smooth-step trees, <= k experts once the nodes saturate; entropy regulariser; "
    "the permutation local search is not implemented",
)
