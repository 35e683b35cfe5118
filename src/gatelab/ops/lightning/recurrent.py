"""Linear attention with a fixed per-head decay, one step at a time with a carried state: the decoding
form (TransNormerLLM (Qin et al., 2023); Lightning Attention-2 (Qin et al., 2024))."""

from __future__ import annotations

import torch

from gatelab.ops.common.varlen import run_packed

from .reference import expand_decay


def lightning_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: state (B, H, K, V) fp32; q, k (B, H, K); v (B, H, V); decay (B, H) log decay.
    Returns o (B, H, V) fp32 and the new state."""
    state = decay.float().exp()[..., None, None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o, state


def lightning_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,  # unused: same signature as every backend
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run :func:`lightning_step` over T. q, k (B, T, H, K); v (B, T, H, V); decay (H,) or (B, T, H);
    initial_state (B, H, K, V). Returns o (B, T, H, V) in q's dtype and the final state (or None)."""
    decay = expand_decay(decay, q)  # (B, T, H)
    if cu_seqlens is not None:
        return run_packed(
            lightning_recurrent, cu_seqlens, (q, k, v, decay), initial_state, output_final_state, scale=scale
        )
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    state = (
        q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
        if initial_state is None
        else initial_state.float()
    )
    outputs = []
    for t in range(T):
        o, state = lightning_step(state, q[:, t], k[:, t], v[:, t], decay[:, t], scale)
        outputs.append(o)
    o = torch.stack(outputs, dim=1).to(q.dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)
