"""PSA's level assignment and its pyramid of pooled keys/values.

PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (Li et al., 2025).
Each (query block, key block) pair gets a level: 1 (all tokens), 2, 4 or 8 (the block's keys and values
mean-pooled over groups of that many tokens) or 0 (skipped). Blocks are ranked by an importance estimate
and the quota of each level is a fraction of the candidate blocks (the paper's "topk" mask mode).
"""

from __future__ import annotations

import torch

LEVELS = (1, 2, 4, 8)


def query_positions(Tq: int, S: int, causal: bool, device) -> torch.Tensor:
    """Absolute position of each query (Tq,): bottom-right aligned when causal (decoding with a cache)."""
    return torch.arange(Tq, device=device) + (S - Tq if causal else 0)


@torch.no_grad()
def psa_levels(
    q, k, *, budget, block_size_q: int, block_size_k: int, causal: bool, scale: float
) -> torch.Tensor:
    """Level of every (query block, key block) pair.

    Importance: the attention mass a block would get, estimated from the block-mean query against the
    block-mean keys, + log(tokens in the block) (a mean key stands for that many keys). Ranks r = 0, 1, ...
    (most important first) among the n candidate blocks get level 1 while r < ceil(f1 n), level 2 while
    r < ceil((f1 + f2) n), and so on; the rest are skipped. Causal: the candidates are the key blocks that
    end before the query block starts; the blocks it overlaps are always level 1 (with the causal mask).

    Args:
        q: (B, Tq, H, D); k: (B, S, Hkv, D). budget: fractions (f1, f2, f4, f8) of candidate blocks.
    Returns:
        (B, H, nQ, nK) int64 levels in {0, 1, 2, 4, 8}.
    """
    B, Tq, H, D = q.shape
    S = k.shape[1]
    bq, bk = block_size_q, block_size_k
    nQ, nK = -(-Tq // bq), -(-S // bk)
    device = q.device
    qf = q.float().transpose(1, 2)  # (B, H, Tq, D)
    kf = k.float().repeat_interleave(H // k.shape[2], dim=2).transpose(1, 2)  # (B, H, S, D)
    q_mean = _block_mean(qf, bq)  # (B, H, nQ, D)
    k_mean = _block_mean(kf, bk)  # (B, H, nK, D)
    count = torch.full((nK,), bk, device=device, dtype=torch.float32)
    count[-1] = S - (nK - 1) * bk
    importance = torch.einsum("bhqd,bhkd->bhqk", q_mean, k_mean) * scale + count.log()  # (B, H, nQ, nK)

    pos = query_positions(Tq, S, causal, device)
    starts = torch.arange(0, Tq, bq, device=device)
    first = pos[starts][:, None]  # (nQ, 1)
    last = pos[(starts + bq - 1).clamp(max=Tq - 1)][:, None]
    block_start = torch.arange(nK, device=device)[None] * bk  # (1, nK)
    if causal:
        candidate = block_start + bk <= first  # wholly before the query block
        forced = (~candidate) & (block_start <= last)  # overlaps the query block: full, causal mask
    else:
        candidate = torch.ones(nQ, nK, dtype=torch.bool, device=device)
        forced = torch.zeros_like(candidate)
    order = importance.masked_fill(~candidate, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nK, device=device).expand_as(order))
    n = candidate.sum(-1, keepdim=True)  # (nQ, 1)
    level = torch.zeros(B, H, nQ, nK, dtype=torch.long, device=device)
    for lvl, fraction in reversed(list(zip(LEVELS, _cumulative(budget)))):
        level = torch.where(rank < torch.ceil(n * fraction - 1e-6), lvl, level)
    level = level.masked_fill(~candidate, 0)
    return level.masked_fill(forced, 1)


def _cumulative(budget) -> list[float]:
    total, out = 0.0, []
    for fraction in budget:
        total += fraction
        out.append(min(total, 1.0))
    return out


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D): mean over each block (the last one may be shorter)."""
    B, H, L, D = x.shape
    n = -(-L // block)
    padded = x.new_zeros(B, H, n * block, D)
    padded[:, :, :L] = x
    count = torch.full((n,), block, device=x.device, dtype=x.dtype)
    count[-1] = L - (n - 1) * block
    return padded.view(B, H, n, block, D).sum(3) / count[:, None]


def pyramid(k: torch.Tensor, v: torch.Tensor, block_size_k: int):
    """Full and pooled keys/values, concatenated along the sequence.

    k (B, S, Hkv, D), v (B, S, Hkv, V) -> k_all (B, S_all, Hkv, D), v_all (B, S_all, Hkv, V) in fp32, and per
    pooled token (S_all,): its level, its key block, and log(tokens it stands for). Level L pools groups of
    L consecutive tokens inside a key block (the last group of a short block may hold fewer).
    """
    S = k.shape[1]
    ks, vs, levels, blocks, log_counts = [], [], [], [], []
    for lvl in LEVELS:
        group = torch.arange(S, device=k.device) // lvl  # (S,) pooled token of each key
        n = int(group[-1]) + 1
        count = torch.zeros(n, device=k.device).index_add_(0, group, torch.ones(S, device=k.device))  # (n,)
        for x, out in ((k, ks), (v, vs)):
            pooled = x.float().new_zeros(x.shape[0], n, *x.shape[2:]).index_add_(1, group, x.float())
            out.append(pooled / count[None, :, None, None])
        levels.append(torch.full((n,), lvl, device=k.device))
        blocks.append(torch.arange(n, device=k.device) * lvl // block_size_k)
        log_counts.append(count.log())
    return torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(levels), torch.cat(blocks), torch.cat(log_counts)


def pyramid_mask(level, Tq: int, S: int, token_level, token_block, *, block_size_q: int, causal: bool):
    """(B, H, Tq, S_all) bool: query i sees pooled token t when its block's level is t's level."""
    rows = torch.arange(Tq, device=level.device) // block_size_q
    mask = level[:, :, rows][:, :, :, token_block] == token_level  # (B, H, Tq, S_all)
    if causal:
        pos = query_positions(Tq, S, causal, level.device)[:, None]  # (Tq, 1)
        index = torch.arange(token_level.shape[0], device=level.device)[None]
        mask = mask & ((token_level != 1) | (index <= pos))  # full keys come first: index == position
    return mask


__all__ = ["psa_levels", "pyramid", "pyramid_mask", "LEVELS"]
