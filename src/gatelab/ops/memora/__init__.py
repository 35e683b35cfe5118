"""Memora (Miras, Behrouz et al., 2025): a matrix memory whose rows stay on the probability simplex, learnt
by the KL-retention (mirror-descent) step W_t = Softmax(alpha_t log W_{t-1} - eta_t grad l2(W_{t-1})), the
softmax over each row (the value dim).

Implemented on the logits A with W = Softmax(A): A_t = alpha_t A_{t-1} - eta_t k_t^T psi(k_t W_{t-1} - v_t),
psi(e) = 2 e. A softmax ignores a constant added to a row, and log W_{t-1} = A_{t-1} - lse(A_{t-1}) differs
from A_{t-1} by one, so this is the paper's step exactly; a zero A is the uniform memory 1/V. With every
gradient of a chunk at its start (the "chunk" backend) the logits are then a linear recurrence, so the
chunk is exact given those gradients: where the paper's chunked training keeps the exact step for a "lag
token" at each chunk start and approximates the rest linearly, this form needs no such approximation.
See :mod:`gatelab.ops.common.memory`."""

from __future__ import annotations

import functools

import torch

from gatelab.ops.common.memory import (
    check_memory_inputs,
    lp_gradient,
    memory_chunk,
    memory_op,
    memory_reference,
)

BACKENDS = ("reference", "chunk", "recurrent")

_l2_gradient = functools.partial(lp_gradient, power=2.0)


def simplex_rows(A: torch.Tensor) -> torch.Tensor:
    """The memory W = softmax(A) over the value dim: every row (..., K, :) non-negative, summing to 1."""
    return torch.softmax(A, dim=-1)


def memora(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
    backend: str = "auto",
    memory: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Memora's memory: o_t = scale q_t Softmax(A_t).

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log retention <= 0; eta: (B, T, H) learning rate
            >= 0. initial_state: (B, H, K, V) logits A (zeros: the uniform memory). Other arguments
            (``memory`` among them) as :func:`gatelab.ops.moneta.moneta`.
    Returns:
        o (B, T, H, V) in q's dtype; the final logits A (B, H, K, V) fp32, or None.
    """
    check_memory_inputs("memora", q, k, v, {"g": g, "eta": eta}, scale=scale)
    return memory_op(
        "memora", _l2_gradient, simplex_rows, q, k, v, g, eta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, memory=memory,
    )  # fmt: skip


def memora_reference(q, k, v, g, eta, **options):
    """The token recurrence (fp32); options as :func:`memory_reference`."""
    return memory_reference(_l2_gradient, simplex_rows, q, k, v, g, eta, **options)


def memora_chunk(q, k, v, g, eta, **options):
    """The chunk-parallel form; options as :func:`memory_chunk`."""
    return memory_chunk(_l2_gradient, simplex_rows, q, k, v, g, eta, **options)


__all__ = ["memora", "memora_reference", "memora_chunk", "simplex_rows", "BACKENDS"]
