"""Pyramid Sparse Attention, the definition: dense fp32 softmax over the full and pooled keys, each query
seeing a key block at exactly one level, pooled logits corrected by + log(tokens pooled)."""

from __future__ import annotations

import torch

from .levels import LEVELS, psa_levels, pyramid, pyramid_mask


def psa_reference(q, k, v, *, budget, block_size_q, block_size_k, causal, scale, return_probs=False):
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V) in q's dtype.

    With ``return_probs`` also the equivalent (B, H, Tq, S) fp32 weights of the S keys (a pooled key's
    probability shared equally by the tokens it averages, so o = weights @ v exactly) and the
    (B, H, nQ, nK) levels.
    """
    B, Tq, H, _ = q.shape
    S = k.shape[1]
    level = psa_levels(
        q, k, budget=budget, block_size_q=block_size_q, block_size_k=block_size_k, causal=causal, scale=scale
    )
    k_all, v_all, token_level, token_block, log_count = pyramid(k, v, block_size_k)  # (B, S_all, Hkv, *)
    mask = pyramid_mask(level, Tq, S, token_level, token_block, block_size_q=block_size_q, causal=causal)
    group = H // k.shape[2]
    k_all, v_all = (
        k_all.repeat_interleave(group, dim=2),
        v_all.repeat_interleave(group, dim=2),
    )  # (B, S_all, H, *)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k_all) * scale + log_count  # (B, H, Tq, S_all)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", probs, v_all).to(q.dtype)
    if not return_probs:
        return o
    # (S_all, S): pooled token t spreads its probability over the keys it averages, 1 / count each.
    start = torch.cat([torch.arange(0, S, lvl, device=q.device) for lvl in LEVELS])  # (S_all,)
    key = torch.arange(S, device=q.device)[None]
    spread = ((key >= start[:, None]) & (key < start[:, None] + token_level[:, None])) / log_count.exp()[
        :, None
    ]
    return o, probs @ spread, level
