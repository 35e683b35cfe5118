"""Bi-level routing attention, the definition: gather the keys and values of the routed regions for every
query region, then fp32 softmax over them (the paper's token-to-token attention, eq. 5)."""

from __future__ import annotations

import torch

from .routing import from_regions, route, to_regions


def biformer_reference(q, k, v, *, grid, topk, scale, return_probs=False):
    """q (B, Hh, Ww, H, D), k (B, Hh, Ww, H, D), v (B, Hh, Ww, H, V) -> (B, Hh, Ww, H, V) in q's dtype
    (and the (B, H, N, N) fp32 probabilities over the tokens in row-major order when ``return_probs``)."""
    B, Hh, Ww, H, _ = q.shape
    index = route(q, k, grid, topk)  # (B, R, topk)
    qr = to_regions(q.float(), grid)  # (B, R, n, H, D)
    kr, vr = to_regions(k.float(), grid), to_regions(v.float(), grid)
    R, n = qr.shape[1], qr.shape[2]
    batch = torch.arange(B, device=q.device)[:, None, None]
    k_sel = kr[batch, index].flatten(2, 3)  # (B, R, topk * n, H, D)
    v_sel = vr[batch, index].flatten(2, 3)
    scores = torch.einsum("brihd,brjhd->brhij", qr, k_sel) * scale  # (B, R, H, n, topk * n)
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("brhij,brjhd->brihd", probs, v_sel)  # (B, R, n, H, V)
    o = from_regions(o, grid, Hh, Ww).to(q.dtype)
    if not return_probs:
        return o
    # Scatter the per-region probabilities back onto the full (N, N) token grid, row-major order.
    full = probs.new_zeros(B, R, H, n, R, n)
    full[batch, torch.arange(R, device=q.device)[None, :, None], :, :, index] = probs.view(
        B, R, H, n, topk, n
    ).permute(0, 1, 4, 2, 3, 5)
    order = to_regions(
        torch.arange(Hh * Ww, device=q.device).view(1, Hh, Ww), grid
    ).flatten()  # region-major -> token
    dense = full.permute(0, 2, 1, 3, 4, 5).reshape(B, H, R * n, R * n)
    out = torch.empty_like(dense)
    out[:, :, order[:, None], order[None, :]] = dense
    return o, out
