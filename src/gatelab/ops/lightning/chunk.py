"""Linear attention with a fixed per-head decay in chunkwise form, in PyTorch with autograd: the
intra-block / inter-block split of Lightning Attention-2 (Lightning Attention-2: A Free Lunch for Handling
Unlimited Sequence Lengths in Large Language Models (Qin et al., 2024), alg. 1).

A scalar decay per head and token makes the intra-block decay a C x C matrix exp(b_i - b_j), masked before
exp, so there is no overflow at any decay strength; the inter-block part carries a (K, V) state.
"""

from __future__ import annotations

import torch

from gatelab.ops.common.chunk import causal_decay_matrix, decayed_chunk_attention

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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form of :func:`lightning_reference`, computed in fp32; arguments and shapes as
    :func:`gatelab.ops.lightning`."""
    B, _, H, K = q.shape
    o, final = decayed_chunk_attention(
        q, k, v, expand_decay(decay, q), _scores, lambda C: B * H * C * max(C, K),
        scale=scale, initial_state=initial_state, chunk_size=chunk_size,
    )  # fmt: skip
    return o, (final if output_final_state else None)


def _scores(qc: torch.Tensor, kc: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intra-block scores (q k^T) * causal decay matrix: (B, H, n, C, K), b (B, H, n, C) ->
    (B, H, n, C, C)."""
    return (qc @ kc.transpose(-1, -2)) * causal_decay_matrix(b)
