"""Moneta (Miras, Behrouz et al., 2025): a matrix memory learnt online with an l_p attentional bias and
l_q normalisation, A_t = alpha_t A_{t-1} - eta_t k_t^T psi_p(k_t W_{t-1} - v_t), W_t = A_t / ||A_t||_q^(q-2),
psi_p(e) = p sign(e) |e|^(p-1) the gradient of ||e||_p^p. See :mod:`gatelab.ops.common.memory`.

Which reading: only a third-party transcription of the paper could be read. It gives Moneta's step as
above, and elsewhere a generic l_q variant W = A / ||A||_p^(p-2) with p = q / (q - 1); the two disagree
for q != 2 and agree (W = A) at q = 2. Moneta's own line is implemented, with the norm over each head's
whole (K, V) memory and a floor on it (``norm_floor``), which the paper does not state: for q > 2 the map
has degree 3 - q and would blow a near-zero memory up."""

from __future__ import annotations

import functools

import torch

from gatelab.ops.common.checks import check_number
from gatelab.ops.common.memory import (
    check_memory_inputs,
    lp_gradient,
    lq_normalize,
    memory_chunk,
    memory_op,
    memory_reference,
)

BACKENDS = ("reference", "chunk", "recurrent")


def moneta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    *,
    bias_power: float = 3.0,
    norm_power: float = 4.0,
    norm_floor: float = 1.0,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
    backend: str = "auto",
    memory: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Moneta's memory: o_t = scale q_t W_t.

    Args:
        q, k: (B, T, H, K) queries and keys (the layer L2-normalises them).
        v: (B, T, H, V) values.
        g: (B, T, H) log retention, alpha_t = exp(g_t) <= 1; q's dtype or float32.
        eta: (B, T, H) learning rate >= 0; q's dtype or float32.
        bias_power: p of the l_p attentional bias, >= 2 (the paper's Moneta: 3).
        norm_power: q of the l_q normalisation, >= 2 (the paper's Moneta: 4; 2: none).
        norm_floor: the norm is floored here before the power (see :func:`lq_normalize`).
        scale: query scale, default K ** -0.5.
        initial_state: (B, H, K, V) the unnormalised memory A before the first token.
        output_final_state: also return the final A.
        cu_seqlens: (N+1,) offsets of packed sequences in a (1, T, ...) batch.
        chunk_size: tokens per chunk of the "chunk" backend (gradients at each chunk's start).
        backend: "reference" / "recurrent" (the token recurrence), "chunk", or "auto" (chunk).
        memory: "matrix", or "mlp": the paper's MLP memory x + LN(W1 gelu(W2 x)), initial_state then the
            pair (W1 (B, H, V, E), W2 (B, H, E, K)), V = K, each weight l_q normalised
            (:mod:`gatelab.ops.common.mlp_memory`).
    Returns:
        o (B, T, H, V) in q's dtype; the final A (B, H, K, V) fp32, or None unless ``output_final_state``.
    """
    check_memory_inputs("moneta", q, k, v, {"g": g, "eta": eta}, scale=scale)
    bias_power = check_number("bias_power", bias_power, low=2.0)
    norm_power = check_number("norm_power", norm_power, low=2.0)
    norm_floor = check_number("norm_floor", norm_floor, low=1e-12)
    return memory_op(
        "moneta", functools.partial(lp_gradient, power=bias_power), lq_readout(norm_power, norm_floor),
        q, k, v, g, eta, scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, backend=backend, memory=memory,
    )  # fmt: skip


def lq_readout(norm_power: float, norm_floor: float):
    """W = A / max(||A||_q, floor)^(q - 2) as a read-out, None (W = A) for q = 2."""
    return None if norm_power == 2 else functools.partial(lq_normalize, power=norm_power, floor=norm_floor)


def moneta_reference(q, k, v, g, eta, *, bias_power=3.0, norm_power=4.0, norm_floor=1.0, **options):
    """The token recurrence (fp32); keyword options as :func:`memory_reference`."""
    psi = functools.partial(lp_gradient, power=bias_power)
    return memory_reference(psi, lq_readout(norm_power, norm_floor), q, k, v, g, eta, **options)


def moneta_chunk(q, k, v, g, eta, *, bias_power=3.0, norm_power=4.0, norm_floor=1.0, **options):
    """The chunk-parallel form; keyword options as :func:`memory_chunk`."""
    psi = functools.partial(lp_gradient, power=bias_power)
    return memory_chunk(psi, lq_readout(norm_power, norm_floor), q, k, v, g, eta, **options)


__all__ = ["moneta", "moneta_reference", "moneta_chunk", "lp_gradient", "BACKENDS"]
