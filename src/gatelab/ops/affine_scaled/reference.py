"""Affine-scaled attention, the definition: the dense weights alpha * softmax(Q K^T / sqrt(d)) + beta on the
visible keys, then the weighted sum of values (Affine-Scaled Attention, Bae et al., 2026, Eq. 6)."""

from __future__ import annotations

import torch

from gatelab.ops.common.masks import attention_mask
from gatelab.ops.softmax import apply_probs, attention_probs


def affine_scaled_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """The weights (B, H, Tq, S) fp32: alpha_t softmax(q_t K^T scale)_j + beta_t on every key j that query t
    sees, 0 on the others (beta never reaches a masked key). q (B, Tq, H, D), k (B, S, Hkv, D),
    alpha and beta (B, Tq, H)."""
    p = attention_probs(q, k, causal=causal, scale=scale)  # (B, H, Tq, S)
    a = alpha.float().transpose(1, 2)[..., None]  # (B, H, Tq, 1)
    b = beta.float().transpose(1, 2)[..., None]
    weights = a * p + b
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, device=q.device)
    return weights if mask is None else weights.masked_fill(~mask, 0.0)


def affine_scaled_reference(q, k, v, alpha, beta, *, causal=True, scale=None) -> torch.Tensor:
    """O = (alpha softmax(Q K^T scale) + beta) V on the visible keys, in fp32; shapes as
    :func:`gatelab.ops.affine_scaled.affine_scaled`."""
    w = affine_scaled_weights(q, k, alpha, beta, causal=causal, scale=scale)
    return apply_probs(w, v, q.shape[2]).to(q.dtype)
