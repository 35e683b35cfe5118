"""Neighborhood attention, the definition: dense fp32 scores over the flattened map, the neighbourhood
mask (plus any additional global keys), softmax, weighted sum of values. Autograd on any device."""

from __future__ import annotations

import torch

from .masks import neighborhood_mask


def full_mask(spatial, kernel_size, stride, dilation, causal, n_extra: int, device) -> torch.Tensor:
    """(N, N + n_extra) bool: the neighbourhood, then the additional keys that every query sees."""
    mask = neighborhood_mask(spatial, kernel_size, stride, dilation, causal, device=device)  # (N, N)
    if n_extra:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], n_extra)], dim=1)
    return mask


def neighborhood_probs(q, k, mask, scale) -> torch.Tensor:
    """q (B, N, H, D), k (B, S, Hkv, D), mask (N, S) -> probabilities (B, H, N, S) in fp32."""
    H, Hkv = q.shape[2], k.shape[2]
    kf = k.float().repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale  # (B, H, N, S)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def neighborhood_reference(q, k, v, mask, scale) -> torch.Tensor:
    """q (B, N, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V), mask (N, S) -> (B, N, H, V) in q's dtype."""
    p = neighborhood_probs(q, k, mask, scale)
    vf = v.float().repeat_interleave(q.shape[2] // v.shape[2], dim=2)  # (B, S, H, V)
    return torch.einsum("bhts,bshd->bthd", p, vf).to(q.dtype)


def neighborhood_sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """The same function through scaled_dot_product_attention with the dense bool mask (has a CPU backward)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, N, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)  # (B, N, H, V)
