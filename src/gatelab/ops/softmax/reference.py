"""Softmax attention, the definition: dense fp32 scores, mask, softmax, weighted sum of values."""

from __future__ import annotations

import torch

from gatelab.ops.common.masks import attention_mask


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Attention probabilities (B, H, Tq, S) in fp32 from q (B, Tq, H, D) and k (B, S, Hkv, D)."""
    H, Hkv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale  # (B, H, Tq, S)
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, sinks=sinks, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def apply_probs(p: torch.Tensor, v: torch.Tensor, H: int) -> torch.Tensor:
    """Weighted sum of values: p (B, H, Tq, S) fp32, v (B, S, Hkv, V) -> (B, Tq, H, V) fp32."""
    vf = v.float().repeat_interleave(H // v.shape[2], dim=2)  # (B, S, H, V)
    return torch.einsum("bhts,bshd->bthd", p, vf)


def softmax_reference(q, k, v, *, causal=True, scale=None, window=None, sinks=0) -> torch.Tensor:
    p = attention_probs(q, k, causal=causal, scale=scale, window=window, sinks=sinks)
    return apply_probs(p, v, q.shape[2]).to(q.dtype)
