"""LINA linear attention, chunkwise-parallel: exact causal weights inside a chunk, a carried (K, V+1) state
between chunks; the bidirectional form is the global phi(K)^T V product."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import lina_features


def causal_linear_attention_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_t = q_t (S_0 + sum_{s<=t} k_s^T v_s) in chunks of ``chunk_size`` tokens, with autograd.

    Args:
        q, k: (B, T, H, K) fp32 (already through the feature map).
        v: (B, T, H, V) fp32.
        initial_state: (B, H, K, V) fp32 or None.
    Returns:
        o (B, T, H, V) and the final state (B, H, K, V), both fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # zero keys and values add nothing to any state
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    qc = q.view(B, N, C, H, K).permute(0, 3, 1, 2, 4)  # (B, H, N, C, K)
    kc = k.view(B, N, C, H, K).permute(0, 3, 1, 2, 4)
    vc = v.view(B, N, C, H, V).permute(0, 3, 1, 2, 4)  # (B, H, N, C, V)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)  # (B, H, N, C, C) inside each chunk
    o = scores @ vc  # (B, H, N, C, V)
    kv = kc.transpose(-1, -2) @ vc  # (B, H, N, K, V): each chunk's contribution
    inclusive = kv.cumsum(dim=2)
    before = torch.cat(
        [torch.zeros_like(kv[:, :, :1]), inclusive[:, :, :-1]], dim=2
    )  # state entering chunk n
    final = inclusive[:, :, -1]
    if initial_state is not None:
        before = before + initial_state[:, :, None]
        final = final + initial_state
    o = o + qc @ before
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]  # (B, T, H, V)
    return o, final


def global_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional: o_t = q_t sum_s k_s^T v_s. q, k (B, T, H, K), v (B, T, H, V) -> (B, T, H, V)."""
    kv = torch.einsum("bshk,bshv->bhkv", k, v)  # (B, H, K, V)
    return torch.einsum("bthk,bhkv->bthv", q, kv)


def lina_chunk(
    q,
    k,
    v,
    key_gate,
    value_gate,
    *,
    causal=True,
    feature_map="relu",
    eps=1e-6,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
):
    """Chunked LINA attention in fp32; see ``gatelab.ops.lina`` for shapes."""
    V = v.shape[-1]
    fq, fk, fv = lina_features(q, k, v, key_gate, value_gate, feature_map)
    if causal:
        h0 = None if initial_state is None else initial_state.float()
        num, final = causal_linear_attention_chunk(fq, fk, fv, h0, chunk_size)
    else:
        num, final = global_linear_attention(fq, fk, fv), None
    o = num[..., :V] / (num[..., V:] + eps)  # the last column is phi(q_t) z_t
    return o.to(q.dtype), (final if output_final_state else None)
