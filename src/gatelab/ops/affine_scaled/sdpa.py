"""Affine-scaled attention without a T x T matrix of its own: alpha times torch's SDPA plus beta times the
sum of the visible values, a running sum along the keys when causal (Affine-Scaled Attention, Bae et al.,
2026, Eq. 6). Exact: (alpha P + beta 1) V = alpha (P V) + beta (1 V) on the visible keys."""

from __future__ import annotations

import torch

from gatelab.ops.softmax.sdpa import softmax_sdpa


def visible_value_sums(v: torch.Tensor, q_len: int, causal: bool) -> torch.Tensor:
    """Sum of the values each query sees: v (B, S, Hkv, V) -> (B, Tq, Hkv, V) fp32.

    Causal queries are bottom-right aligned (query t sees keys 0 .. S - Tq + t): the first query's sum over
    the S - Tq + 1 keys every query sees, then a running sum over the last Tq - 1 keys only, so a decoding
    step (Tq = 1) reduces the cache without a (B, S, Hkv, V) running sum; a bidirectional query sees all S.
    """
    vf = v.float()
    if not causal:
        return vf.sum(dim=1, keepdim=True).expand(-1, q_len, -1, -1)
    first = v.shape[1] - q_len + 1
    seen = vf[:, :first].sum(dim=1, keepdim=True)  # (B, 1, Hkv, V): what the first query sees
    return torch.cat([seen, seen + vf[:, first:].cumsum(dim=1)], dim=1)


def affine_scaled_sdpa(q, k, v, alpha, beta, *, causal=True, scale=None) -> torch.Tensor:
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V), alpha/beta (B, Tq, H) -> (B, Tq, H, V)."""
    H, Hkv = q.shape[2], k.shape[2]
    attended = softmax_sdpa(q, k, v, causal=causal, scale=scale).float()  # (B, Tq, H, V)
    sums = visible_value_sums(v, q.shape[1], causal).repeat_interleave(H // Hkv, dim=2)  # (B, Tq, H, V)
    o = alpha.float()[..., None] * attended + beta.float()[..., None] * sums
    return o.to(q.dtype)
