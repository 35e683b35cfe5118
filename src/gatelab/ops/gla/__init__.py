"""Gated linear attention (Gated Linear Attention Transformers with Hardware-Efficient Training
(Yang et al., 2023)): a (K, V) state with a data-dependent key-wise forget gate."""

from __future__ import annotations

import importlib.util

import torch

from gatelab.ops.common.backend import resolve_backend, triton_available
from gatelab.ops.common.checks import check_cu_seqlens, check_log_gate, check_qkv, check_tensor

from .chunk import gla_chunk
from .recurrent import gla_recurrent, gla_step
from .reference import gla_attention_matrix, gla_reference

BACKENDS = ("reference", "chunk", "recurrent", "triton")
AUTO_ORDER = ("triton", "chunk")  # "auto" takes the Triton kernels on CUDA, the chunked form elsewhere


def check_linear_options(
    op: str,
    q: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> None:
    """Checks every linear-attention op shares: cu_seqlens, initial_state (B or N, H, K, V), chunk_size."""
    B, T, H, K = q.shape
    check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "(B, H, K, V)")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        expected = (n, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            who = "N sequences" if cu_seqlens is not None else "B"
            raise ValueError(
                f"{op}: initial_state must have shape (B or N, H, K, V) = {expected} ({who}), "
                f"got {tuple(initial_state.shape)}"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def _triton_ready(q: torch.Tensor) -> bool:
    return triton_available(q) and importlib.util.find_spec(__name__ + ".triton") is not None


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q, k: (B, T, H, K) queries and keys.
        v: (B, T, H, V) values.
        g: (B, T, H, K) log forget gate (<= 0), e.g. logsigmoid(...) / 16 as the paper.
        scale: query scale, default K ** -0.5.
        initial_state: (B, H, K, V) state to start from (fp32), or (N, H, K, V) with cu_seqlens.
        output_final_state: also return the final state (B, H, K, V) fp32 (or (N, H, K, V)).
        cu_seqlens: (N+1,) int offsets of packed sequences in a (1, T, ...) batch; each starts afresh.
        chunk_size: tokens per chunk of the chunked form.
        backend: "reference" (fp32 loop), "chunk", "recurrent", "triton" (CUDA), or "auto".
    Returns:
        o: (B, T, H, V) in q's dtype, and the final state or None.
    """
    H, Hkv = check_qkv(q, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"gla: k and v must have as many heads as q ({H}), got {Hkv}")
    check_tensor("g", g, 4, "(B, T, H, K)")
    if g.shape != k.shape:
        raise ValueError(f"g must have the shape of k (B, T, H, K) = {tuple(k.shape)}, got {tuple(g.shape)}")
    if g.device != q.device:  # g may be fp32 while q is bf16: gates are often computed in fp32
        raise ValueError(f"g is on {g.device} but q is on {q.device}; move them to one device")
    check_log_gate("g", g.detach())
    check_linear_options("gla", q, v, initial_state, cu_seqlens, chunk_size)
    available = {"reference": True, "chunk": True, "recurrent": True, "triton": lambda: _triton_ready(q)}
    name = resolve_backend("gla", backend, available, AUTO_ORDER)
    if name == "triton":
        from .triton import gla_triton as fn
    else:
        fn = {"reference": gla_reference, "chunk": gla_chunk, "recurrent": gla_recurrent}[name]
    return fn(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )


__all__ = [
    "gla",
    "gla_reference",
    "gla_chunk",
    "gla_recurrent",
    "gla_step",
    "gla_attention_matrix",
    "BACKENDS",
    "check_linear_options",
]
