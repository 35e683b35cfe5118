"""What the routers share: a straight-through hard choice, attention with per-key multipliers (the form in
which a hard routing decision still gets a gradient), and the routing record of ``internals``."""

from __future__ import annotations

import torch

from gatelab.ops.softmax import apply_probs

UNITS = ("chunks", "heads", "layers", "tokens")


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The value of ``hard`` with the gradient of ``soft``: ``hard + (soft - sg(soft))``. The same estimator
    as ``hard - sg(soft) + soft``, but the forward is ``hard`` bit for bit (x - x is exactly 0, whereas
    (1 - p) + p need not be exactly 1 in floating point)."""
    return hard + (soft - soft.detach())


def weighted_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in which key j's exp(score) is multiplied by ``weights`` (0: hidden, 1: visible):

        p_ij = w_ij exp(s_ij) / sum_j' w_ij' exp(s_ij'),   o_i = sum_j p_ij v_j.

    With w in {0, 1} this is masked softmax attention; the gradient with respect to w_ij at w = 1 is the
    derivative of the loss by a multiplier on exp(s_ij), which is how NAtS-L's router learns from its
    softmax branch. q (B, Tq, H, D), k (B, S, H, D), v (B, S, H, V), weights (B, H, Tq, S) with at least one
    positive entry per query -> o (B, Tq, H, V) fp32, p (B, H, Tq, S) fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale  # (B, H, Tq, S)
    visible = weights > 0
    top = scores.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True).detach()
    # hidden keys: exp of a masked score is exactly 0, so an exp overflow of a hidden key cannot leak in
    e = torch.exp((scores - top).masked_fill(~visible, float("-inf"))) * weights
    p = e / e.sum(-1, keepdim=True)
    return apply_probs(p, v, q.shape[2]), p


def route_record(expensive_fraction: torch.Tensor, unit: str) -> dict:
    """``internals["route"]``: the fraction (0-dim fp32) routed to the expensive (softmax/full) path and the
    unit it counts (chunks, heads, layers or tokens)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return {"expensive_fraction": expensive_fraction.detach().float().reshape(()), "unit": unit}


__all__ = ["straight_through", "weighted_attention", "route_record", "UNITS"]
