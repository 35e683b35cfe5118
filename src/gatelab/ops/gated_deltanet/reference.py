"""Gated DeltaNet, the definition: the paper's recurrence token by token in fp32, and the equivalent
T x T matrix (Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang et al., 2024)."""

from __future__ import annotations

import torch

from gatelab.ops.common.recurrent import initial_or_zeros


def gated_deltanet_reference(
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
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = q_t S_t (q a row), alpha_t =
    exp(g_t); arguments and shapes as :func:`gatelab.ops.gated_deltanet`."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf = q.float() * scale, k.float(), v.float()
    alpha, bf = g.float().exp(), beta.float()
    S = initial_or_zeros(initial_state, q, v)  # (B, H, K, V) fp32
    eye = torch.eye(K, dtype=torch.float32, device=q.device)
    outputs = []
    for t in range(T):
        k_t, b_t = kf[:, t], bf[:, t, :, None, None]  # (B, H, K), (B, H, 1, 1)
        # the paper's transition matrix, written out: alpha_t (I - beta_t k_t k_t^T)
        transition = alpha[:, t, :, None, None] * (
            eye - b_t * k_t[..., :, None] * k_t[..., None, :]
        )  # (B, H, K, K)
        S = transition @ S + b_t * k_t[..., :, None] * vf[:, t, :, None, :]  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    return o.to(q.dtype), (S if output_final_state else None)


def gated_deltanet_attention_matrix(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """The matrix A (B, H, T, T) fp32 with o = A v for a zero initial state (the output is linear in v).

    Computed by running the reference recurrence on identity values: value j of the batch is e_j, so
    output column j is what token j's value contributes to every output. q, k (B, T, H, K); g, beta (B, T, H).
    """
    B, T, H, K = q.shape
    eye = torch.eye(T, dtype=torch.float32, device=q.device)
    values = eye[None, :, None, :].expand(B, T, H, T)  # (B, T, H, T): value of token j is e_j
    o, _ = gated_deltanet_reference(q.float(), k.float(), values, g, beta, scale=scale)  # (B, T, H, T)
    return o.permute(0, 2, 1, 3)  # (B, H, T, T): A[b, h, t, j]
