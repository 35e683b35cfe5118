"""Per-query-block visibility rows -> a FlexAttention BlockMask for the routed ops (hip, psa, biformer),
on top of the shared helpers in :mod:`gatelab.ops.common.flex`.

Eager flex ignores block indices and applies only the mask_mod, so every caller attaches a mask_mod that
agrees with the blocks; compiled flex skips the blocks that are not listed, so the listed blocks cover
every visible (query, key) pair (a block is listed when any of its pairs is visible).
"""

from __future__ import annotations

import torch

from gatelab.ops.common import flex
from gatelab.ops.common.backend import resolve_backend


def block_mask_from_rows(
    rows: torch.Tensor, q_block: int, T: int, S: int, mask_mod, block: int = flex.BLOCK_SIZE
):
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
    B, H, nQ, _ = rows.shape
    per = max(1, -(-block // q_block))  # rows of ``rows`` per flex query block
    flex_q = per * q_block
    nQc, nKc = -(-T // flex_q), -(-S // block)
    padded = rows.new_zeros(B, H, nQc * per, nKc * block)
    padded[:, :, :nQ, :S] = rows
    coarse = padded.view(B, H, nQc, per, nKc, block).any(dim=5).any(dim=3)  # (B, H, nQc, nKc)
    kv_num = coarse.sum(-1, dtype=torch.int32)  # (B, H, nQc)
    kv_idx = torch.argsort((~coarse).to(torch.int8), dim=-1, stable=True)  # listed blocks first
    return flex.block_mask_from_routing(kv_num, kv_idx, mask_mod, T, S, block_size=(flex_q, block))


def run_flex(q, k, v, block_mask, scale: float, score_mod=None, compiled: bool | None = None) -> torch.Tensor:
    """q (B, T, H, D), k (B, S, Hkv, D), v (B, S, Hkv, V) -> (B, T, H, V) through FlexAttention.

    An empty batch (B = 0) does not reach flex, whose vmapped mask_mods index per-batch routing that has no
    rows: its empty output is returned, still attached to q, k and v for autograd."""
    if q.shape[0] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + (q.sum() + k.sum() + v.sum()) * 0
    if not torch.is_grad_enabled():  # flex refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    return flex.run_flex(q, k, v, block_mask, scale=scale, score_mod=score_mod, compile=compiled)


def routed_backend(op: str, backend: str, q: torch.Tensor) -> str:
    """The backend a routed op runs, "reference" or "flex" (see :func:`auto_order` for "auto")."""
    return resolve_backend(op, backend, {"reference": True, "flex": flex.flex_supported}, auto_order(q))


def auto_order(q: torch.Tensor) -> tuple[str, ...]:
    """What backend="auto" tries: flex on CUDA (it has a backward there), else the reference (CPU flex has
    no backward, and eager flex is slower than the dense reference at the sizes a CPU trains)."""
    return ("flex", "reference") if q.is_cuda else ("reference",)
