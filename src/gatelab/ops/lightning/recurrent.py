"""Linear attention with a fixed per-head decay, one step at a time with a carried state: the decoding
form (TransNormerLLM (Qin et al., 2023); Lightning Attention-2 (Qin et al., 2024))."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import run_steps

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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run :func:`lightning_step` over T; arguments and shapes as :func:`gatelab.ops.lightning`."""
    decay = expand_decay(decay, q)  # (B, T, H)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return run_steps(
        lightning_step, q, k, v, decay, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state,
    )  # fmt: skip
