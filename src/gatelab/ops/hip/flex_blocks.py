"""FlexAttention plumbing for data-dependent (routed) masks: a BlockMask built with ``from_kv_blocks`` from
per-query-block visibility rows, and the guard against CPU backward. Used by hip, psa and biformer.

Eager flex ignores block indices and applies only the mask_mod, so every caller attaches a mask_mod that
agrees with the blocks; compiled flex skips the blocks that are not listed, so the listed blocks must
cover every visible (query, key) pair.
"""

from __future__ import annotations

import torch

_COMPILED = {}


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def check_flex_grad(op: str, *tensors: torch.Tensor) -> None:
    """Flex has no backward on CPU: say so instead of failing deep inside autograd."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and tensors[0].device.type == "cpu":
        raise RuntimeError(
            f"{op}: backend='flex' has no backward on CPU and these inputs require grad; "
            f"use backend='reference' for training on CPU, or run under torch.no_grad()"
        )


def block_mask_from_rows(rows: torch.Tensor, q_block: int, T: int, S: int, mask_mod, block: int = 128):
    """A BlockMask listing every flex block that holds at least one visible pair.

    Args:
        rows: (B, H, nQ, S) bool: rows[b, h, i, s] is True when some query of query block i (queries
            i * q_block ... (i + 1) * q_block - 1) may see key s. B and H may be 1 (broadcast).
        q_block: queries per row of ``rows``.
        T, S: query and key lengths.
        mask_mod: the exact token-level mask (what eager flex applies).
        block: flex block size along the keys; along the queries it is the smallest multiple of
            ``q_block`` that is >= ``block``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, H, nQ, _ = rows.shape
    per = max(1, -(-block // q_block))  # rows of ``rows`` per flex query block
    flex_q = per * q_block
    nQc, nKc = -(-T // flex_q), -(-S // block)
    padded = rows.new_zeros(B, H, nQc * per, nKc * block)
    padded[:, :, :nQ, :S] = rows
    coarse = padded.view(B, H, nQc, per, nKc, block).any(dim=5).any(dim=3)  # (B, H, nQc, nKc)
    kv_num = coarse.sum(-1, dtype=torch.int32)  # (B, H, nQc)
    kv_idx = torch.argsort((~coarse).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # listed first
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, BLOCK_SIZE=(flex_q, block), mask_mod=mask_mod, seq_lengths=(T, S)
    )


def run_flex(q, k, v, block_mask, scale: float, score_mod=None, compiled: bool = False) -> torch.Tensor:
    """q (B, T, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, T, H, V) through FlexAttention."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compiled:
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED["fn"]
    o = fn(
        q.transpose(1, 2),  # (B, H, T, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)  # (B, T, H, V)
