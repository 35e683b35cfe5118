"""HiP attention through FlexAttention: the same hierarchical block mask, as a BlockMask (from_kv_blocks)
plus a mask_mod that looks the selected blocks up, so eager and compiled flex agree."""

from __future__ import annotations

import torch

from gatelab.ops.common.flex import check_flex_inputs
from gatelab.ops.common.flex_blocks import block_mask_from_rows, run_flex

from .mask import hip_select, query_positions


def hip_flex(q, k, v, *, topk, block_size_q, block_size_k, sinks, window, causal, scale, compiled=None):
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V)."""
    check_flex_inputs("hip", q, k, v)
    options = dict(
        block_size_q=block_size_q, block_size_k=block_size_k, sinks=sinks, window=window, causal=causal
    )
    block_mask = hip_block_mask(q, k, topk=topk, scale=scale, **options)
    return run_flex(q, k, v, block_mask, scale, compiled=compiled)


def hip_block_mask(q, k, *, topk, block_size_q, block_size_k, sinks, window, causal, scale):
    """The BlockMask (with its mask_mod) of HiP's mask for q (B, Tq, H, D) and k (B, S, Hkv, D)."""
    Tq, S = q.shape[1], k.shape[1]
    bq, bk = block_size_q, block_size_k
    selected = hip_select(
        q, k, topk=topk, block_size_q=bq, block_size_k=bk, causal=causal, scale=scale
    )  # (B, H, nQ, nK)
    offset = S - Tq if causal else 0

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        visible = selected[b, h, q_idx // bq, kv_idx // bk] | (kv_idx < sinks)
        if window > 0:
            visible = visible | ((pos - kv_idx).abs() < window)
        return visible & (kv_idx <= pos) if causal else visible

    # Rows of the block mask: what each query block may see, at token resolution along the keys.
    pos = query_positions(Tq, S, causal, q.device)
    starts = torch.arange(0, Tq, bq, device=q.device)
    first = pos[starts][:, None]  # (nQ, 1)
    last = pos[(starts + bq - 1).clamp(max=Tq - 1)][:, None]
    key = torch.arange(S, device=q.device)[None]  # (1, S)
    rows = selected[..., key[0] // bk] | (key < sinks)  # (B, H, nQ, S)
    if window > 0:
        rows = rows | ((key > first - window) & (key < last + window))
    if causal:
        rows = rows & (key <= last)
    # Flex blocks the size of HiP's key blocks (when a kernel tile fits) visit only the selected blocks.
    block = bk if bk % 16 == 0 and 32 <= bk <= 128 else 128
    return block_mask_from_rows(rows, bq, Tq, S, mask_mod, block=block)
