"""Gated linear attention one step at a time with a carried state: the decoding form (Gated Linear Attention
Transformers with Hardware-Efficient Training (Yang et al., 2023))."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import run_steps


def gla_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: state (B, H, K, V) fp32; q, k, g (B, H, K); v (B, H, V). Returns o (B, H, V) fp32 and
    the new state."""
    state = g.float().exp()[..., None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o, state


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run :func:`gla_step` over T; arguments and shapes as :func:`gatelab.ops.gla`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return run_steps(
        gla_step, q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )
