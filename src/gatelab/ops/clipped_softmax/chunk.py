"""Clipped softmax attention in query blocks: never holds more than (B, H, block, S) scores, so memory is
linear in T per block instead of the reference's full T x S matrix; matmuls run in the input dtype,
the softmax in fp32."""

from __future__ import annotations

import torch

from gatelab.ops.common.masks import attention_mask

from .reference import clip_probs


def clipped_softmax_chunk(q, k, v, *, zeta=1.0, gamma=0.0, causal=True, scale=None, block_size=256):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kh = k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
    vh = v.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, S, V)
    qh = q.transpose(1, 2)  # (B, H, T, D)
    mask = attention_mask(T, S, causal=causal, device=q.device)  # (T, S) or None
    outputs = []
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        visible = end + S - T if causal else S  # causal: keys after the block's last query are all masked
        scores = (
            qh[:, :, start:end] @ kh[:, :, :visible].transpose(-1, -2)
        ).float() * scale  # (B, H, blk, S')
        if mask is not None:
            scores = scores.masked_fill(~mask[start:end, :visible], float("-inf"))
        p = clip_probs(torch.softmax(scores, dim=-1), zeta, gamma).to(v.dtype)
        outputs.append(p @ vh[:, :, :visible])  # (B, H, blk, V)
    return torch.cat(outputs, dim=2).transpose(1, 2)  # (B, T, H, V)
