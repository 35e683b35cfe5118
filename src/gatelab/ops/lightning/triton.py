"""Lightning attention (linear attention with a fixed per-head decay) on the chunked GLA Triton kernels
("Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths", Qin et al., 2024).

The decay is a per-head scalar, so the GLA kernels run it with the log decay broadcast over K; the
gradient of the decay is the sum of the GLA gate gradient over K (and over B, T for a per-head decay).
"""

from __future__ import annotations

import torch

from gatelab.ops.gla.triton import gla_triton


def lightning_triton(
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
    """S_t = exp(decay) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t on the GLA kernels; arguments and
    shapes as :func:`gatelab.ops.lightning`."""
    B, T, H, K = q.shape
    if decay.shape == (H,):
        g = decay.view(1, 1, H, 1).expand(B, T, H, K)  # (B, T, H, K)
    elif decay.shape == (B, T, H):
        g = decay[..., None].expand(B, T, H, K)
    else:
        raise ValueError(
            f"decay must have shape (H,)={(H,)} or (B, T, H)={(B, T, H)}, got {tuple(decay.shape)}"
        )
    return gla_triton(
        q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )  # fmt: skip


__all__ = ["lightning_triton"]
