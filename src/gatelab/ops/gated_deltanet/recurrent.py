"""Gated DeltaNet, step by step with a carried state: the delta-rule form used for decoding
(Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang et al., 2024)."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import initial_or_zeros


def gated_deltanet_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q (already scaled), k (B, H, K); v (B, H, V); g, beta (B, H); state (B, H, K, V), all fp32.

    alpha (I - beta k k^T) S + beta k v^T = alpha S + k (beta (v - alpha S^T k))^T: decay the memory,
    read what it predicts for k, and write back beta times the error. Returns o (B, H, V) and the new state.
    """
    state = state * g.exp()[..., None, None]
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)  # (B, H, V)
    correction = beta[..., None] * (v - predicted)  # (B, H, V)
    state = state + k[..., :, None] * correction[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def gated_deltanet_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token loop over :func:`gated_deltanet_step` in fp32; arguments and shapes as
    :func:`gatelab.ops.gated_deltanet`."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf, bf = q.float() * scale, k.float(), v.float(), g.float(), beta.float()
    S = initial_or_zeros(initial_state, q, v)  # (B, H, K, V) fp32
    outputs = []
    for t in range(T):
        o_t, S = gated_deltanet_step(qf[:, t], kf[:, t], vf[:, t], gf[:, t], bf[:, t], S)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    return o.to(q.dtype), (S if output_final_state else None)
