"""Sliding window + sinks through FlexAttention: one mask_mod, its block mask cached per (Tq, S, window, sinks)."""

from __future__ import annotations

from gatelab.ops.common.flex import BLOCK_SIZE, cached_block_mask, run_flex


def make_mask_mod(window: int, sinks: int, offset: int):
    """Keys bottom-right aligned: query q_idx sits at position q_idx + offset, offset = S - Tq."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        seen = kv_idx <= q_pos
        recent = q_pos - kv_idx < window
        if sinks:
            recent = recent | (kv_idx < sinks)
        return seen & recent

    return mask_mod


def sliding_window_block_mask(Tq: int, S: int, window: int, sinks: int, device, block_size: int = BLOCK_SIZE):
    return cached_block_mask(
        ("sliding_window", window, sinks),
        lambda: make_mask_mod(window, sinks, S - Tq),
        Tq,
        S,
        device,
        block_size,
    )


def sliding_window_flex(q, k, v, *, window, sinks, scale, block_size: int = BLOCK_SIZE, compile=None):
    """q (B, Tq, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, Tq, H, V)."""
    block_mask = sliding_window_block_mask(q.shape[1], k.shape[1], window, sinks, q.device, block_size)
    return run_flex(q, k, v, block_mask, scale=scale, compile=compile)
