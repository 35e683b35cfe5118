"""Linear attention with a fixed per-head decay in chunkwise form, in PyTorch with autograd: the
intra-block / inter-block split of Lightning Attention-2 (Lightning Attention-2: A Free Lunch for Handling
Unlimited Sequence Lengths in Large Language Models (Qin et al., 2024), alg. 1).

A scalar decay per head and token makes the intra-block decay a C x C matrix exp(b_i - b_j), masked before
exp, so there is no overflow at any decay strength; the inter-block part carries a (K, V) state.
"""

from __future__ import annotations

import torch

from gatelab.ops.common.chunk import (
    carry_across_chunks,
    causal_decay_matrix,
    chunk_cumsum,
    chunk_qkv,
    from_chunks,
    to_chunks,
)
from gatelab.ops.common.varlen import run_packed
from gatelab.ops.gla.chunk import GROUP_ELEMENTS

from .reference import expand_decay


def lightning_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form of :func:`lightning_reference`, computed in fp32; arguments and shapes as
    :func:`gatelab.ops.lightning`."""
    decay = expand_decay(decay, q)  # (B, T, H)
    if cu_seqlens is not None:
        return run_packed(
            lightning_chunk,
            cu_seqlens,
            (q, k, v, decay),
            initial_state,
            output_final_state,
            scale=scale,
            chunk_size=chunk_size,
        )
    T, K, C = q.shape[1], q.shape[-1], chunk_size
    qc, kc, vc = chunk_qkv(q, k, v, C, scale)  # (B, H, N, C, K), (B, H, N, C, K), (B, H, N, C, V) fp32
    b = chunk_cumsum(to_chunks(decay, C))  # (B, H, N, C), <= 0, non-increasing
    # Inter-block: each block's contribution decayed to its end, then the sequential scan of states.
    o, final = carry_across_chunks(qc, kc, vc, b[..., None], initial_state)  # (B, H, N, C, V)
    # Intra-block: (q k^T) * causal decay matrix, times values; a group of blocks at a time so that the
    # temporaries stay small (large ones come as fresh pages from the OS on every call, see gla's chunk).
    B, H, N = qc.shape[:3]
    group = max(1, GROUP_ELEMENTS // (B * H * C * max(C, K)))
    pieces = zip(*(x.split(group, dim=2) for x in (qc, kc, b, vc)))
    intra = [((qg @ kg.transpose(-1, -2)) * causal_decay_matrix(bg)) @ vg for qg, kg, bg, vg in pieces]
    o = o + torch.cat(intra, dim=2)
    return from_chunks(o, T).to(q.dtype), (final if output_final_state else None)
