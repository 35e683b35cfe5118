"""Softmax attention through torch's scaled_dot_product_attention (FlashAttention / memory-efficient /
CPU flash kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatelab.ops.common.masks import attention_mask


def softmax_sdpa(q, k, v, *, causal=True, scale=None, window=None, sinks=0) -> torch.Tensor:
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V)."""
    Tq, S = q.shape[1], k.shape[1]
    plain_causal = causal and window is None and Tq == S  # SDPA's is_causal is top-left aligned
    mask = None
    if not plain_causal:
        mask = attention_mask(Tq, S, causal=causal, window=window, sinks=sinks, device=q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, Tq, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=plain_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)  # (B, Tq, H, V)
