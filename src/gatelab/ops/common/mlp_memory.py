"""The Miras memories with the paper's MLP memory M(x) = x + LN(W1 gelu(W2 x)) per head in place of a
matrix (It's All Connected, Behrouz et al., 2025): the same online step on each weight's accumulator,

    grad_j = d l(M_{W}(k_j) - v_j) / d(W1, W2) at W = R(A),   A <- alpha A - eta grad,   o_t = M_{R(A_t)}(q_t),

R the read-out applied to each weight (l_q normalisation, row softmax, or none). The gradient is written
out by hand (batched over every token of a chunk at once) and checked against autograd in the tests. LN has
no affine parameters (eps 1e-5); the residual needs V = K. The read is M(q), without a query scale.
"""

from __future__ import annotations

import math

import torch

from gatelab.ops.common.chunk import chunk_length, from_chunks, to_chunks
from gatelab.ops.gated_deltanet.chunk import segment_sums

LN_EPS = 1e-5
MLPState = tuple[torch.Tensor, torch.Tensor]  # (W1 (B, H, V, E), W2 (B, H, E, K)) fp32


def gelu_derivative(h: torch.Tensor) -> torch.Tensor:
    """d/dh of the exact GELU h Phi(h): Phi(h) + h phi(h)."""
    cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
    return cdf + h * torch.exp(-0.5 * h.square()) / math.sqrt(2 * math.pi)


def mlp_read(W1: torch.Tensor, W2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M(x) = x + LN(W1 gelu(W2 x)): W1 (B, H, [C,] V, E), W2 (B, H, [C,] E, K), x (B, H, C, K) -> (B, H, C, V);
    weights with a C dim hold one memory per token."""
    per_token = W2.ndim == 5
    h = torch.einsum("bhcek,bhck->bhce" if per_token else "bhek,bhck->bhce", W2, x)
    z = torch.einsum("bhcve,bhce->bhcv" if per_token else "bhve,bhce->bhcv", W1, torch.nn.functional.gelu(h))
    return x + torch.nn.functional.layer_norm(z, z.shape[-1:], eps=LN_EPS)


def mlp_gradient_terms(W1, W2, k, v, psi, *extra):
    """The per-token gradient of the loss at the memory (W1 (B, H, V, E), W2 (B, H, E, K)) for keys k
    (B, H, C, K) and values v (B, H, C, V), as rank-1 factors: dW1_j = dz_j a_j^T, dW2_j = dh_j k_j^T.
    Returns (dz (B, H, C, V), a (B, H, C, E), dh (B, H, C, E))."""
    h = torch.einsum("bhek,bhck->bhce", W2, k)
    a = torch.nn.functional.gelu(h)
    z = torch.einsum("bhve,bhce->bhcv", W1, a)
    mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    inv_std = torch.rsqrt(var + LN_EPS)
    n = (z - mean) * inv_std
    dy = psi(k + n - v, *extra)  # d loss / d prediction
    dz = inv_std * (dy - dy.mean(-1, keepdim=True) - n * (dy * n).mean(-1, keepdim=True))  # LN backward
    dh = torch.einsum("bhve,bhcv->bhce", W1, dz) * gelu_derivative(h)
    return dz, a, dh


def mlp_memory_chunk(
    psi, readout, q, k, v, g, eta, *extra, initial_state: MLPState, output_final_state=False, chunk_size=16
):
    """Chunk-parallel form (gradients at each chunk's start); chunk_size 1 is the token recurrence.

    q, k, v (B, T, H, K); g, eta, extra (B, T, H); initial_state (W1 (B, H, V, E), W2 (B, H, E, K)) the
    accumulators. Returns o (B, T, H, V) in q's dtype and the final accumulators or None."""
    T = q.shape[1]
    C = chunk_length(chunk_size, T)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 inside, fp64 kept
    qc, kc, vc = (to_chunks(x, C, dtype) for x in (q, k, v))  # (B, H, N, C, K)
    gc, ec = to_chunks(g, C, dtype), to_chunks(eta, C, dtype)  # (B, H, N, C); padding: eta = 0, g = 0
    xc = [to_chunks(x, C, dtype) for x in extra]
    gamma = segment_sums(gc).exp()  # (B, H, N, C, C)
    G = gc.cumsum(dim=-1).exp()  # (B, H, N, C)
    read = (lambda A: A) if readout is None else readout
    A1, A2 = (s.to(dtype) for s in initial_state)
    outputs = []
    for n in range(qc.shape[2]):
        dz, a, dh = mlp_gradient_terms(read(A1), read(A2), kc[:, :, n], vc[:, :, n], psi,
                                       *(x[:, :, n, :, None] for x in xc))  # fmt: skip
        weights = gamma[:, :, n] * ec[:, :, n, None, :]  # (B, H, C, C): Gamma[t, j] eta_j
        decay = G[:, :, n, :, None, None]  # (B, H, C, 1, 1)
        A1_t = decay * A1[:, :, None] - torch.einsum(
            "bhtj,bhjv,bhje->bhtve", weights, dz, a
        )  # (B, H, C, V, E)
        A2_t = decay * A2[:, :, None] - torch.einsum("bhtj,bhje,bhjk->bhtek", weights, dh, kc[:, :, n])
        outputs.append(mlp_read(read(A1_t), read(A2_t), qc[:, :, n]))
        A1, A2 = A1_t[:, :, -1], A2_t[:, :, -1]  # padded tokens leave the memory as it was
    o = from_chunks(torch.stack(outputs, dim=2), T)  # (B, T, H, V)
    return o.to(q.dtype), ((A1, A2) if output_final_state else None)


def check_mlp_state(op: str, q: torch.Tensor, v: torch.Tensor, initial_state) -> None:
    """The MLP memory needs V = K and an initial (W1 (B, H, V, E), W2 (B, H, E, K)) pair."""
    B, _, H, K = q.shape
    if v.shape[-1] != K:
        raise ValueError(f"{op}: the MLP memory's residual needs V = K, got K={K}, V={v.shape[-1]}")
    if not (isinstance(initial_state, tuple) and len(initial_state) == 2):
        raise TypeError(f"{op}: memory='mlp' needs initial_state = (W1 (B, H, V, E), W2 (B, H, E, K)), "
                        f"got {type(initial_state).__name__}")  # fmt: skip
    W1, W2 = initial_state
    E = W1.shape[-1] if W1.ndim == 4 else -1
    if W1.shape != (B, H, K, E) or W2.shape != (B, H, E, K):
        raise ValueError(f"{op}: initial_state must be W1 (B, H, V, E) = {(B, H, K, 'E')} and W2 (B, H, E, K), "
                         f"got {tuple(W1.shape)} and {tuple(W2.shape)}")  # fmt: skip


__all__ = ["mlp_read", "mlp_gradient_terms", "mlp_memory_chunk", "check_mlp_state", "gelu_derivative"]
