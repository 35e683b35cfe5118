"""Pyramid Sparse Attention through FlexAttention: one pass over the full and pooled keys, a mask_mod that
picks each key block's level, a score_mod that adds log(tokens pooled), and a BlockMask from the levels."""

from __future__ import annotations

import torch

from gatelab.ops.common.flex import check_flex_inputs
from gatelab.ops.common.flex_blocks import block_mask_from_rows, run_flex

from .levels import psa_levels, pyramid, query_positions


def psa_flex(q, k, v, *, budget, block_size_q, block_size_k, causal, scale, compiled=None):
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V)."""
    check_flex_inputs("psa", q, k, v)
    options = dict(
        budget=budget, block_size_q=block_size_q, block_size_k=block_size_k, causal=causal, scale=scale
    )
    k_all, v_all, block_mask, score_mod = psa_flex_inputs(q, k, v, **options)
    return run_flex(q, k_all, v_all, block_mask, scale, score_mod=score_mod, compiled=compiled)


def psa_flex_inputs(q, k, v, *, budget, block_size_q, block_size_k, causal, scale):
    """What flex runs: k_all (B, S_all, Hkv, D) and v_all (B, S_all, Hkv, V) (full then 2x, 4x, 8x pooled),
    the BlockMask (with its mask_mod) and the score_mod adding log(tokens pooled)."""
    Tq, S = q.shape[1], k.shape[1]
    bq = block_size_q
    level = psa_levels(
        q, k, budget=budget, block_size_q=bq, block_size_k=block_size_k, causal=causal, scale=scale
    )
    k_all, v_all, token_level, token_block, log_count = pyramid(k, v, block_size_k)
    k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
    offset = S - Tq if causal else 0

    def mask_mod(b, h, q_idx, kv_idx):
        visible = level[b, h, q_idx // bq, token_block[kv_idx]] == token_level[kv_idx]
        if causal:
            visible = visible & ((token_level[kv_idx] != 1) | (kv_idx <= q_idx + offset))
        return visible

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + log_count[kv_idx]

    # Rows of the block mask: per query block, the pooled tokens of its blocks at their level.
    rows = level[..., token_block] == token_level  # (B, H, nQ, S_all)
    if causal:
        pos = query_positions(Tq, S, causal, q.device)
        last = pos[(torch.arange(0, Tq, bq, device=q.device) + bq - 1).clamp(max=Tq - 1)][:, None]  # (nQ, 1)
        index = torch.arange(token_level.shape[0], device=q.device)[None]
        rows = rows & ((token_level != 1) | (index <= last))
    block_mask = block_mask_from_rows(rows, bq, Tq, k_all.shape[1], mask_mod)
    return k_all, v_all, block_mask, score_mod
