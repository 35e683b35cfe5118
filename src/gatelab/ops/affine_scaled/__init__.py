"""Affine-scaled attention (Affine-Scaled Attention, Bae et al., 2026, Eq. 6): the softmax weights rescaled
and shifted per query, O = (alpha(x) softmax(Q K^T / sqrt(d)) + beta(x)) V, beta added to visible keys only."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_attention_values, check_qkv, check_tensor
from gatelab.ops.softmax import check_attention_options

from .reference import affine_scaled_reference, affine_scaled_weights
from .sdpa import affine_scaled_sdpa, visible_value_sums

BACKENDS = ("reference", "sdpa")


def check_affine_terms(q: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> None:
    """alpha and beta: one value per query and head, (B, Tq, H), floating, on q's device."""
    for name, x in (("alpha", alpha), ("beta", beta)):
        check_tensor(name, x, 3, "(B, Tq, H)")
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"{name} must have shape (B, Tq, H) = {tuple(q.shape[:3])}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move them to one device")


def affine_scaled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """O = (alpha softmax(Q K^T scale) + beta) V, with beta added on the keys each query sees only.

    Args:
        q: (B, Tq, H, D) queries.
        k: (B, S, Hkv, D) keys; H a multiple of Hkv (grouped-query attention).
        v: (B, S, Hkv, V) values.
        alpha: (B, Tq, H) scale of each query's softmax weights.
        beta: (B, Tq, H) shift added to each visible key's weight (the paper's beta(X), already divided by
            the number of keys: the mixer computes it).
        causal: mask future keys (bottom-right aligned when Tq < S, as for decoding with a cache).
        scale: score scale, default D ** -0.5.
        backend: "reference" (dense fp32 weights), "sdpa" (SDPA plus beta times the visible-value sums: no
            T x T weights of its own), or "auto" (sdpa).
    Returns:
        o: (B, Tq, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    check_attention_options(q, k, causal, None, 0)
    check_affine_terms(q, alpha, beta)
    check_attention_values("affine_scaled", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    name = resolve_backend("affine_scaled", backend, {"reference": True, "sdpa": True}, ("sdpa",))
    fn = affine_scaled_reference if name == "reference" else affine_scaled_sdpa
    return fn(q, k, v, alpha, beta, causal=causal, scale=scale)


__all__ = [
    "affine_scaled",
    "affine_scaled_reference",
    "affine_scaled_sdpa",
    "affine_scaled_weights",
    "visible_value_sums",
    "BACKENDS",
]
