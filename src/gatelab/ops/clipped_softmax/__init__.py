"""Clipped softmax attention from "Quantizable Transformers: Removing Outliers by Helping Attention Heads
Do Nothing" (Bondarenko et al., 2023): probabilities stretched to [gamma, zeta] and clipped to [0, 1]."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_attention_values, check_number, check_qkv
from gatelab.ops.softmax import check_attention_options

from .chunk import clipped_softmax_chunk
from .reference import clip_probs, clipped_probs, clipped_softmax_reference

BACKENDS = ("reference", "chunk")


def check_clip_range(zeta: float, gamma: float) -> None:
    """zeta >= 1 (the stretch's upper end) and gamma <= 0 (its lower end, e.g. -alpha / T), both finite: an
    infinite stretch times a probability of 0 is NaN, and NaN passes every plain comparison."""
    check_number("zeta", zeta, low=1)
    check_number("gamma", gamma, high=0)


def clipped_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    zeta: float = 1.0,
    gamma: float = 0.0,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention with weights clip((zeta - gamma) * softmax(scores) + gamma, 0, 1).

    Args:
        q: (B, T, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, V) (GQA when Hkv < H).
        zeta: upper stretch (>= 1); values above 1 after stretching clip to exactly 1.
        gamma: lower stretch (<= 0); the paper sets gamma = -alpha / T. zeta=1, gamma=0 is plain softmax.
        causal: causal mask, bottom-right aligned when T < S.
        scale: score scale, default D ** -0.5.
        backend: "reference" (fp32 dense), "chunk" (query blocks, input dtype), or "auto" (= chunk).
    Returns:
        o: (B, T, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    check_attention_options(q, k, causal, None, 0)
    check_clip_range(zeta, gamma)
    check_attention_values("clipped_softmax", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    name = resolve_backend("clipped_softmax", backend, {"reference": True, "chunk": True}, ("chunk",))
    fn = clipped_softmax_reference if name == "reference" else clipped_softmax_chunk
    return fn(q, k, v, zeta=zeta, gamma=gamma, causal=causal, scale=scale)


__all__ = ["clipped_softmax", "clipped_probs", "clip_probs", "check_clip_range", "BACKENDS"]
