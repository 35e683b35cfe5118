"""Gated linear attention, the definition: the recurrence token by token in fp32 (Gated Linear Attention
Transformers with Hardware-Efficient Training (Yang et al., 2023), eq. 3)."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import token_loop_backend


def gla_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t: state (B, H, K, V)
    fp32; q, k, g (B, H, K); v (B, H, V). Returns o (B, H, V) fp32 and the new state."""
    state = g.float().exp()[..., None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o, state


# (q, k, v, g, *, scale, initial_state, output_final_state): the recurrence over T in fp32, shapes as gla
gla_reference = token_loop_backend(gla_step, "gla_reference")


def gla_attention_matrix(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The T x T matrix A with o = A v (initial state zero): A[i, j] = scale * sum_k q_ik k_jk
    prod_{j < s <= i} exp(g_sk) for j <= i, else 0. q, k, g: (B, T, H, K) -> A (B, H, T, T) fp32.

    Memory is T * T * K per head: for diagnostics on short sequences."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b = g.float().cumsum(1)  # (B, T, H, K)
    diff = b[:, :, None] - b[:, None, :]  # (B, Ti, Tj, H, K); masked before exp (positive above the diagonal)
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[:, :, None, None]
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    A = torch.einsum("bihk,bjhk,bijhk->bhij", q.float() * scale, k.float(), decay)
    return A
