"""Gated DeltaNet, step by step with a carried state: the delta-rule form used for decoding
(Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang et al., 2024)."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import token_loop_backend


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


def _scaled_step(state, q, k, v, g, beta, scale):
    """:func:`gated_deltanet_step` with the argument order and fp32 casts that ``run_steps`` uses."""
    return gated_deltanet_step(q.float() * scale, k.float(), v.float(), g.float(), beta.float(), state)


# (q, k, v, g, beta, *, scale, initial_state, output_final_state): the token loop in fp32
gated_deltanet_recurrent = token_loop_backend(_scaled_step, "gated_deltanet_recurrent")
