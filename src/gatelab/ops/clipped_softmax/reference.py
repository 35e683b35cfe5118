"""Clipped softmax attention, the definition: dense fp32 probabilities, stretched and clipped."""

from __future__ import annotations

import torch

from gatelab.ops.softmax.reference import apply_probs, attention_probs


def clip_probs(p: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """clip((zeta - gamma) * p + gamma, 0, 1): Quantizable Transformers, eq. 4.1. With gamma < 0 a small
    probability becomes an exact 0, so a head can attend to nothing without a huge logit range."""
    return torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)


def clipped_probs(q, k, *, zeta=1.0, gamma=0.0, causal=True, scale=None) -> torch.Tensor:
    """Clipped attention weights (B, H, Tq, S) fp32. Masked keys stay exactly 0 since gamma <= 0."""
    return clip_probs(attention_probs(q, k, causal=causal, scale=scale), zeta, gamma)


def clipped_softmax_reference(q, k, v, *, zeta=1.0, gamma=0.0, causal=True, scale=None) -> torch.Tensor:
    p = clipped_probs(q, k, zeta=zeta, gamma=gamma, causal=causal, scale=scale)
    return apply_probs(p, v, q.shape[2]).to(q.dtype)
