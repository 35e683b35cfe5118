"""Yaad (Miras, Behrouz et al., 2025): a matrix memory learnt online with a Huber attentional bias whose
threshold delta_t depends on the input: the l2 gradient e while ||e|| <= delta_t, delta_t sign(e) (the l1
gradient scaled by delta_t) beyond. A_t = alpha_t A_{t-1} - eta_t k_t^T psi(k_t A_{t-1} - v_t); no
normalisation. See :mod:`gatelab.ops.common.memory`."""

from __future__ import annotations

import torch

from gatelab.ops.common.memory import check_memory_inputs, memory_chunk, memory_op, memory_reference

BACKENDS = ("reference", "chunk", "recurrent")


def huber_gradient(error: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """e (..., V) where ||e||_2 <= delta (..., 1), else delta sign(e). The gradient of the Huber loss
    (1/2 ||e||^2 inside), switched on the error vector's norm as the paper writes it. sign's derivative is
    0, so it is detached: an infinite delta then leaves no inf * 0 in the backward."""
    inside = error.norm(dim=-1, keepdim=True) <= delta
    return torch.where(inside, error, delta * error.sign().detach())


def yaad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    delta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
    backend: str = "auto",
    memory: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Yaad's memory: o_t = scale q_t A_t.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V); g: (B, T, H) log retention <= 0; eta: (B, T, H) learning
            rate >= 0; delta: (B, T, H) Huber threshold > 0 (inf: plain l2, the delta rule).
        Other arguments (``memory`` among them) as :func:`gatelab.ops.moneta.moneta`.
    Returns:
        o (B, T, H, V) in q's dtype; the final memory (B, H, K, V) fp32, or None.
    """
    check_memory_inputs("yaad", q, k, v, {"g": g, "eta": eta, "delta": delta}, scale=scale)
    if not torch.compiler.is_compiling() and delta.numel() and not bool((delta.detach() > 0).all()):
        raise ValueError(f"yaad: delta (the Huber threshold) must be > 0, got min {float(delta.min()):.4g}")
    return memory_op(
        "yaad", huber_gradient, None, q, k, v, g, eta, (delta,), scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size, backend=backend, memory=memory,
    )  # fmt: skip


def yaad_reference(q, k, v, g, eta, delta, **options):
    """The token recurrence (fp32) with the Huber gradient; options as :func:`memory_reference`."""
    return memory_reference(huber_gradient, None, q, k, v, g, eta, delta, **options)


def yaad_chunk(q, k, v, g, eta, delta, **options):
    """The chunk-parallel form with the Huber gradient; options as :func:`memory_chunk`."""
    return memory_chunk(huber_gradient, None, q, k, v, g, eta, delta, **options)


__all__ = ["yaad", "yaad_reference", "yaad_chunk", "huber_gradient", "BACKENDS"]
