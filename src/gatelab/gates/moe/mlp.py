"""The MoE MLP: a router sends each token to some of E small SwiGLU experts and mixes their outputs.

    mlp = MoEMLP(d_model=64, expert_hidden=88, n_experts=4, router="comet", router_options={"k": 2})
    y = mlp(x)                 # x (B, T, d_model) -> y (B, T, d_model)
    mlp.last                   # the RouterOutput of the last call (aux losses, expert load, drops)

Two paths give the same output: ``"dense"`` (the reference: every expert on every token, weighted) and
``"sparse"`` (each expert runs only on the tokens routed to it, gathered and scattered back). Tokens reach
the router position-major (all sequences' first tokens, then their second ...), so with a capacity an
earlier position is never dropped for a later one. Without a capacity every token is routed on its own,
so token-by-token decoding gives the parallel pass's output; with one, what is dropped depends on the tokens
of the call (a one-token decoding step drops nothing).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.ops.common.checks import check_choice
from gatelab.registry import make_mixer

from ._router import ROLE, RouterOutput, expert_linear

PATHS = ("sparse", "dense")


def router_keys() -> list[str]:
    """The registered MoE routers' keys."""
    from gatelab.registry import list_mechanisms

    return [s.key for s in list_mechanisms(family="gate") if s.extra.get("role") == ROLE]


def make_router(key: str, **options) -> nn.Module:
    """The router registered under ``key`` built with ``options``; a key that is no router is an error."""
    if not isinstance(key, str) or key not in router_keys():
        raise ValueError(f"unknown MoE router {key!r}; routers: {', '.join(router_keys())}")
    return make_mixer(key, **options)


def check_sizes(*, path: str = "sparse", **sizes) -> None:
    """The MoE MLP's own options: positive int sizes and a known path."""
    check_choice("path", path, PATHS)
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"MoE MLP: {name} must be a positive int, got {value!r}")


class MoEMLP(nn.Module):
    def __init__(
        self,
        d_model: int,
        expert_hidden: int,
        n_experts: int = 4,
        router: str = "topk",
        router_options: dict | None = None,
        path: str = "sparse",
    ):
        super().__init__()
        check_sizes(d_model=d_model, expert_hidden=expert_hidden, n_experts=n_experts, path=path)
        self.path, self.n_experts, self.expert_hidden = path, n_experts, expert_hidden
        self.router_key = router
        self.router = make_router(router, d_model=d_model, n_experts=n_experts, **(router_options or {}))
        self.gate_up = expert_linear(n_experts, d_model, 2 * expert_hidden)  # (E, d, 2h)
        self.down = expert_linear(n_experts, expert_hidden, d_model)  # (E, h, d)
        self.last: RouterOutput | None = None

    def reset_parameters(self, std: float, n_layers: int) -> None:
        """The LM's init for its MLPs: N(0, std), the projection into the residual stream / sqrt(2 L); the
        router keeps its own."""
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=std / math.sqrt(2 * n_layers))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x (n, d) -> (n, d)."""
        gate, up = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoE MLP input must be (B, T, d_model), got {got}")
        B, T, d = x.shape
        tokens = x.transpose(0, 1).reshape(T * B, d)  # position-major: capacity favours earlier positions
        out = self.router(tokens)
        self.last = out
        weights = out.weights.to(x.dtype)  # (N, E)
        if self.path == "dense":
            gate, up = torch.einsum("nd,edh->enh", tokens, self.gate_up).chunk(2, dim=-1)
            experts = torch.einsum("enh,ehd->end", F.silu(gate) * up, self.down)  # (E, N, d)
            y = torch.einsum("ne,end->nd", weights, experts)
        else:
            y = torch.zeros_like(tokens)
            for e in range(self.n_experts):
                rows = out.mask[:, e].nonzero().squeeze(-1)  # the tokens routed to expert e
                if len(rows):
                    y = y.index_add(0, rows, weights[rows, e, None] * self.expert(e, tokens[rows]))
        return y.reshape(T, B, d).transpose(0, 1)


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def moe_aux_loss(model: nn.Module):
    """Sum of the MoE layers' auxiliary losses (load balance, a router's own) of the last forward; 0 when
    the model has no MoE layer. The trainer adds it to the loss (``extra_losses``)."""
    layers = moe_layers(model)
    if any(layer.last is None for layer in layers):
        raise RuntimeError("moe_aux_loss() needs a forward pass first")
    return sum((layer.last.aux_loss for layer in layers), 0.0) if layers else 0.0


def moe_stats(model: nn.Module) -> dict[str, float]:
    """The MoE layers' stats of the last forward, averaged over layers (empty without MoE layers): expert
    load (max / mean, coefficient of variation), active-expert fraction, dropped assignments, aux loss."""
    layers = [layer for layer in moe_layers(model) if layer.last is not None]
    if not layers:
        return {}
    rows = [{**layer.last.stats, "aux_loss": float(layer.last.aux_loss.detach())} for layer in layers]
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if all(key in r for r in rows)}
