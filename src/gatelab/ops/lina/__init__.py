"""Linear attention with division-based normalisation and LINA's KV gate (LINA: Linear Autoregressive Image
Generative Models with Continuous Tokens (Wang et al., 2026))."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import (
    check_attention_values,
    check_choice,
    check_number,
    check_qkv,
    check_same,
    check_tensor,
)
from gatelab.ops.common.linear import check_linear_options, run_linear

from .chunk import causal_linear_attention_chunk, global_linear_attention, lina_chunk
from .recurrent import lina_recurrent, lina_step
from .reference import FEATURE_MAPS, lina_attention_matrix, lina_features, lina_reference, phi

_FUNCTIONS = {"reference": lina_reference, "chunk": lina_chunk, "recurrent": lina_recurrent}
BACKENDS = tuple(_FUNCTIONS)


def check_state_free(op: str, causal: bool, initial_state, output_final_state: bool) -> None:
    """The bidirectional form has no recurrent state: refuse one rather than ignore it."""
    if not causal and initial_state is not None:
        raise ValueError(
            f"{op}: the bidirectional form (causal=False) has no state; initial_state must be None"
        )
    if not causal and output_final_state:
        raise ValueError(
            f"{op}: the bidirectional form (causal=False) has no state; pass output_final_state=False"
        )


def check_options(op: str, causal, eps, chunk_size, backend) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    check_number(f"{op}: eps", eps, low=0)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if backend == "recurrent" and not causal:
        raise ValueError(f"{op}: backend='recurrent' runs the causal form only; use 'chunk' or 'reference'")


def _check_gate(name: str, gate, q: torch.Tensor) -> torch.Tensor:
    if gate is None:
        return q.new_ones(q.shape[:3])
    check_tensor(name, gate, 3, "(B, T, H)")
    check_same("q", q, **{name: gate})
    if gate.shape != q.shape[:3]:
        raise ValueError(f"{name} must have shape (B, T, H) = {tuple(q.shape[:3])}, got {tuple(gate.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(gate).all()):
        raise ValueError(f"{name} must be finite, found inf or NaN")
    return gate


def lina(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_gate: torch.Tensor | None = None,
    value_gate: torch.Tensor | None = None,
    causal: bool = True,
    feature_map: str = "relu",
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised linear attention with a KV gate.

        o_t = phi(q_t) S_t / (phi(q_t) z_t + eps),
        S_t = sum_s g^k_s phi(k_s)^T (g^v_s v_s),  z_t = sum_s g^k_s phi(k_s)^T

    with s <= t (causal) or over all T tokens (bidirectional). The KV gate, as in the paper's public code,
    multiplies the key features and the values by learned scalars per head and per token (``key_gate``,
    ``value_gate``) after the feature map, so the key gate weights a token in the numerator and the normaliser
    alike. The paper's gate is a data-independent parameter per (head, position); an input-dependent variant
    passes gates computed from the input. phi is LINA's ReLU + 1e-6 by default. LINA's code divides both sums
    by N (means instead of sums), which is this formula with eps * N in place of eps.

    Args:
        q, k: (B, T, H, K) queries and keys before the feature map.
        v: (B, T, H, V) values.
        key_gate, value_gate: (B, T, H) scales on phi(k_t) and v_t per head and token; None means 1. Used as
            given, as LINA's unconstrained parameters: negative key gates can drive the normaliser to 0.
        causal: token t sees s <= t; False is the bidirectional (encoder / vision) form, which has no state.
        feature_map: phi, "relu" (ReLU + 1e-6, LINA's), "elu" (ELU + 1) or "identity" (already non-negative).
        eps: added to the normaliser phi(q_t) z_t.
        chunk_size: tokens per chunk of the chunk backend.
        initial_state: (B, H, K, V+1) fp32, or (N, H, K, V+1) with cu_seqlens: [..., :V] is S, [..., V] is z.
        output_final_state: return the state after the last token, same layout.
        cu_seqlens: (N+1,) int offsets of N packed sequences in a (1, T, ...) batch; each runs on its own.
        backend: "reference" (dense fp32), "chunk", "recurrent" (causal only), or "auto" (chunk).
    Returns:
        o: (B, T, H, V) in q's dtype; final state (B, H, K, V+1) fp32 or None.
    """
    check_qkv(q, k, v, same_length=True)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"lina: q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}"
        )
    key_gate = _check_gate("key_gate", key_gate, q)
    value_gate = _check_gate("value_gate", value_gate, q)
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_options("lina", causal, eps, chunk_size, backend)
    check_state_free("lina", causal, initial_state, output_final_state)
    check_linear_options("lina", q, v, initial_state, cu_seqlens, None, extra_columns=1)
    check_attention_values("lina", q.shape[1], causal=causal, k=k, v=v)
    return run_linear(
        "lina", backend, _FUNCTIONS, (q, k, v, key_gate, value_gate), chunk_size=chunk_size, causal=causal,
        feature_map=feature_map, eps=float(eps), initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = [
    "lina",
    "lina_reference",
    "lina_chunk",
    "lina_recurrent",
    "lina_step",
    "lina_features",
    "lina_attention_matrix",
    "causal_linear_attention_chunk",
    "global_linear_attention",
    "phi",
    "BACKENDS",
    "FEATURE_MAPS",
    "check_state_free",
    "check_options",
]
