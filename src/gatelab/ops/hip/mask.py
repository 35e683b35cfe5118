"""HiP's mask estimation: per query block, the top-k key blocks found by hierarchical halving and re-scoring.

A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned Attention
(Lee et al., 2024), section 3. The candidate key blocks are first split into ``topk`` contiguous groups;
each iteration halves every group, scores each half by one representative key (its middle token) and
keeps the ``topk`` best halves. After log2(n / topk) iterations every group is one key block: the mask.
Cost per query block: O(topk * log(S / block_size_k)) representative scores, so O(T log T) in all.
"""

from __future__ import annotations

import torch


def query_positions(Tq: int, S: int, causal: bool, device) -> torch.Tensor:
    """Absolute position of each query (Tq,): bottom-right aligned when causal (decoding with a cache)."""
    return torch.arange(Tq, device=device) + (S - Tq if causal else 0)


def _representative_scores(qb, kf, lo, hi, last, pos_blocks, block_k, causal, scale):
    """Score of each group of key blocks [lo, hi) for each query block: the best q.k * scale of the block's
    queries against one representative key, the middle token of the group (HiP scores a branch by one
    token, so a round costs O(topk) dot products per query instead of O(topk * block_size_k)).

    qb (B, H, nQ, bq, D) fp32 queries per block (padded rows masked by pos_blocks < 0); kf (B, H, S, D)
    fp32; lo, hi (B, H, nQ, m) block ranges; last (nQ,) last query position -> (B, H, nQ, m) fp32.
    """
    B, H, S, D = kf.shape
    token = (lo + hi) * block_k // 2  # (B, H, nQ, m) middle token of the group
    token = token.clamp(max=S - 1)
    if causal:
        token = torch.minimum(token, last[:, None])  # visible to the block's last query
    gathered = kf.gather(2, token.flatten(2)[..., None].expand(-1, -1, -1, D)).view(*token.shape, D)
    scores = torch.einsum("bhnid,bhnmd->bhnmi", qb, gathered) * scale  # (B, H, nQ, m, bq)
    ok = (pos_blocks >= 0)[:, :, :, None, :]
    if causal:
        ok = ok & (token[..., None] <= pos_blocks[:, :, :, None, :])
    return scores.masked_fill(~ok, float("-inf")).amax(dim=-1)


@torch.no_grad()
def hip_select(
    q, k, *, topk: int, block_size_q: int, block_size_k: int, causal: bool, scale: float
) -> torch.Tensor:
    """Selected key blocks per query block.

    Args:
        q: (B, Tq, H, D) queries; k: (B, S, Hkv, D) keys (GQA: H a multiple of Hkv).
    Returns:
        (B, H, nQ, nK) bool, nQ = ceil(Tq / block_size_q), nK = ceil(S / block_size_k). A block is only
        ever selected when some query of the block may see part of it (causal).
    """
    B, Tq, H, D = q.shape
    S = k.shape[1]
    bq, bk = block_size_q, block_size_k
    nQ, nK = -(-Tq // bq), -(-S // bk)
    device = q.device
    kf = k.float().repeat_interleave(H // k.shape[2], dim=2).transpose(1, 2)  # (B, H, S, D)
    qf = q.float().transpose(1, 2)  # (B, H, Tq, D)
    qb = qf.new_zeros(B, H, nQ * bq, D)
    qb[:, :, :Tq] = qf
    qb = qb.view(B, H, nQ, bq, D)
    pos = query_positions(Tq, S, causal, device)
    pos_pad = torch.full((nQ * bq,), -1, device=device, dtype=torch.long)
    pos_pad[:Tq] = pos
    pos_blocks = pos_pad.view(1, 1, nQ, bq).expand(B, H, nQ, bq)
    last = pos_pad.view(nQ, bq).amax(dim=1)  # (nQ,) last position in each query block
    n_cand = (last // bk + 1).clamp(max=nK) if causal else torch.full_like(last, nK)  # (nQ,)

    # topk groups over [0, n): group g covers [g * n // topk, (g + 1) * n // topk); empty when n < topk.
    g = torch.arange(topk, device=device)
    lo = (g[None] * n_cand[:, None]) // topk  # (nQ, topk)
    hi = ((g[None] + 1) * n_cand[:, None]) // topk
    lo, hi = lo.expand(B, H, nQ, topk).clone(), hi.expand(B, H, nQ, topk).clone()
    biggest = -(-int(n_cand.max()) // topk)
    while biggest > 1:
        mid = (lo + hi + 1) // 2  # a group of one block keeps itself as the left half, an empty right half
        c_lo = torch.cat([lo, mid], dim=-1)  # (B, H, nQ, 2 topk)
        c_hi = torch.cat([mid, hi], dim=-1)
        nonempty = c_hi > c_lo
        score = _representative_scores(qb, kf, c_lo, c_hi, last, pos_blocks, bk, causal, scale)
        score = score.masked_fill(~nonempty, float("-inf"))
        keep = score.topk(topk, dim=-1).indices  # (B, H, nQ, topk)
        lo, hi = c_lo.gather(-1, keep), c_hi.gather(-1, keep)
        biggest = -(-biggest // 2)
    selected = torch.zeros(B, H, nQ, nK + 1, dtype=torch.bool, device=device)
    index = torch.where(hi > lo, lo, nK)  # empty groups go to a spare column
    selected.scatter_(-1, index, True)
    return selected[..., :nK]


def token_mask(
    selected, Tq: int, S: int, *, block_size_q: int, block_size_k: int, causal: bool, sinks: int, window: int
):
    """(B, H, Tq, S) bool: selected blocks, plus sink keys and the local window, all clipped causally."""
    device = selected.device
    pos = query_positions(Tq, S, causal, device)[:, None]  # (Tq, 1)
    key = torch.arange(S, device=device)[None]  # (1, S)
    rows = torch.arange(Tq, device=device) // block_size_q
    cols = torch.arange(S, device=device) // block_size_k
    mask = selected[:, :, rows][:, :, :, cols]  # (B, H, Tq, S)
    dense = key < sinks
    if window > 0:
        dense = dense | ((pos - key).abs() < window)
    mask = mask | dense
    if causal:
        mask = mask & (key <= pos)
    return mask
