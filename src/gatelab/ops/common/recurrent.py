"""Token-by-token linear attention: the state a recurrence starts from and the loop over a one-token step,
shared by the reference and recurrent (decoding) backends."""

from __future__ import annotations

from collections.abc import Callable

import torch


def initial_or_zeros(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``initial_state`` (B, H, K, V) in fp32, or fp32 zeros of that shape for q (B, T, H, K) and
    v (B, T, H, V)."""
    if initial_state is not None:
        return initial_state.float()
    B, _, H, K = q.shape
    return q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)


def run_steps(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t, S_t = step(S_{t-1}, q_t, k_t, v_t, gate_t, scale) for t = 1 .. T.

    q, k (B, T, H, K); v (B, T, H, V); gate (B, T, H, ...) indexed along T like them; initial_state
    (B, H, K, V) or None (zeros). Returns o (B, T, H, V) in q's dtype and the final state (B, H, K, V)
    fp32, or None unless ``output_final_state``.
    """
    state = initial_or_zeros(initial_state, q, v)
    outputs = []
    for t in range(q.shape[1]):
        o, state = step(state, q[:, t], k[:, t], v[:, t], gate[:, t], scale)
        outputs.append(o)
    o = torch.stack(outputs, dim=1).to(q.dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)


__all__ = ["initial_or_zeros", "run_steps"]
