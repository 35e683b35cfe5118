"""HiP attention, the definition: the hierarchical block mask made dense, then fp32 masked softmax."""

from __future__ import annotations

import torch

from .mask import hip_select, token_mask


def hip_reference(
    q, k, v, *, topk, block_size_q, block_size_k, sinks, window, causal, scale, return_probs=False
):
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V) in q's dtype
    (and the (B, H, Tq, S) fp32 probabilities when ``return_probs``)."""
    B, Tq, H, _ = q.shape
    S = k.shape[1]
    selected = hip_select(
        q, k, topk=topk, block_size_q=block_size_q, block_size_k=block_size_k, causal=causal, scale=scale
    )
    mask = token_mask(
        selected,
        Tq,
        S,
        block_size_q=block_size_q,
        block_size_k=block_size_k,
        causal=causal,
        sinks=sinks,
        window=window,
    )  # (B, H, Tq, S)
    group = H // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)  # (B, S, H, D)
    vf = v.float().repeat_interleave(group, dim=2)  # (B, S, H, V)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * scale  # (B, H, Tq, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)
    return (o, probs) if return_probs else o
