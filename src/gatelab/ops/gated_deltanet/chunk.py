"""Gated DeltaNet, chunkwise parallel with the WY / UT representation, in PyTorch with autograd
(Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang et al., 2024, section 3.3).

Within a chunk starting from state S_0, write the update as S_t = alpha_t S_{t-1} + k_t u_t^T with
u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t). Unrolling, with Gamma[i, j] = prod_{j < l <= i} alpha_l and
G_i = prod_{l <= i} alpha_l,

    (I + A) U = diag(beta) V - diag(beta G) K S_0,     A = tril(diag(beta) (Gamma * K K^T), -1),

so U = T diag(beta) V - T diag(beta G) K S_0 with T = (I + A)^{-1} (one unit-lower-triangular solve per
chunk, for every chunk at once). Calling the two right-hand terms u and w S_0, the chunk's outputs and its
final state are

    O = diag(G) Q S_0 + tril(Gamma * Q K^T) (u - w S_0),
    S_C = G_C S_0 + (K * Gamma[C, :])^T (u - w S_0).

Only the last two lines run chunk after chunk; everything else is batched over all chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """(..., C) log decays -> (..., C, C) with [i, j] = sum_{j < l <= i} g_l for i >= j, -inf above.

    Summed directly rather than as cumsum[i] - cumsum[j]: with strong decay the cumulative sums are
    large and their difference would lose the small relative decays to cancellation. The upper triangle
    is masked *before* exp, so no entry can overflow (every exponent is <= 0).
    """
    C = g.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    x = g[..., :, None].expand(*g.shape, C).masked_fill(~strict, 0.0)  # x[i, j] = g_i for i > j
    sums = x.cumsum(dim=-2)  # [i, j] = sum_{j < l <= i} g_l
    return sums.masked_fill(
        ~strict.logical_or(torch.eye(C, dtype=torch.bool, device=g.device)), float("-inf")
    )


def gated_deltanet_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise Gated DeltaNet, computed in fp32; arguments and shapes as
    :func:`gatelab.ops.gated_deltanet`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # (B, T, H, ...) -> (B, H, N, C, ...) fp32; padded tokens have k = 0 and beta = 0 (no write) and
        # g = 0 (no decay), so they leave the state exactly as it was.
        x = x.float().transpose(1, 2)  # (B, H, T, ...)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    qc, kc, vc = blocks(q) * scale, blocks(k), blocks(v)  # (B, H, N, C, K|V)
    gc, bc = blocks(g), blocks(beta)  # (B, H, N, C)

    g_cum = gc.cumsum(dim=-1)  # (B, H, N, C): log G_i, from the chunk start
    gamma = segment_sums(gc).exp()  # (B, H, N, C, C): Gamma[i, j], zero above the diagonal
    k_beta = kc * bc[..., None]  # (B, H, N, C, K)

    # the UT transform: solve (I + A) [u | w] = [diag(beta) V | diag(beta G) K] for every chunk at once
    A = (k_beta @ kc.transpose(-1, -2) * gamma).tril(-1)  # (B, H, N, C, C)
    rhs = torch.cat([vc * bc[..., None], k_beta * g_cum.exp()[..., None]], dim=-1)  # (B, H, N, C, V + K)
    uw = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # diagonal of A not read
    u, w = uw.split([V, K], dim=-1)  # (B, H, N, C, V), (B, H, N, C, K)

    intra = qc @ kc.transpose(-1, -2) * gamma  # (B, H, N, C, C), lower triangle incl. diagonal
    k_to_end = kc * gamma[..., -1, :, None]  # (B, H, N, C, K): k_j * Gamma[C, j]
    chunk_decay = g_cum[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1): G_C

    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    starts, new_values = [], []
    # unbind, not u[:, :, n]: the backward of N slices would write N full-size zero gradients (O(N^2))
    per_chunk = zip(u.unbind(2), w.unbind(2), k_to_end.transpose(-1, -2).unbind(2), chunk_decay.unbind(2))
    for u_n, w_n, k_end_n, decay_n in per_chunk:
        starts.append(S)
        v_new = u_n - w_n @ S  # (B, H, C, V)
        new_values.append(v_new)
        S = S * decay_n + k_end_n @ v_new
    S_starts = torch.stack(starts, dim=2)  # (B, H, N, K, V)
    v_new = torch.stack(new_values, dim=2)  # (B, H, N, C, V)

    o = (qc * g_cum.exp()[..., None]) @ S_starts + intra @ v_new  # (B, H, N, C, V)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(q.dtype), (S if output_final_state else None)
