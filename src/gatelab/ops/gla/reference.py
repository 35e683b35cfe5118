"""Gated linear attention, the definition: the recurrence token by token in fp32 (Gated Linear Attention
Transformers with Hardware-Efficient Training (Yang et al., 2023), eq. 3)."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import initial_or_zeros


def gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t; arguments and shapes as
    :func:`gatelab.ops.gla`."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf = q.float() * scale, k.float(), v.float(), g.float()
    S = initial_or_zeros(initial_state, q, v)  # (B, H, K, V) fp32
    outputs = []
    for t in range(T):
        S = gf[:, t, :, :, None].exp() * S + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    return o.to(q.dtype), (S if output_final_state else None)


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
