"""Gated linear attention (Gated Linear Attention Transformers with Hardware-Efficient Training
(Yang et al., 2023)): a (K, V) state with a data-dependent key-wise forget gate."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_attention_values, check_log_gate, check_qkv, check_tensor
from gatelab.ops.common.linear import check_linear_options, run_linear

from .chunk import gla_chunk
from .recurrent import gla_recurrent, gla_step
from .reference import gla_attention_matrix, gla_reference

_FUNCTIONS = {"reference": gla_reference, "chunk": gla_chunk, "recurrent": gla_recurrent, "triton": None}
BACKENDS = tuple(_FUNCTIONS)


# Default tokens per chunk of each backend. "chunk" (PyTorch) at T=2048, B=1, H=4, K=V=64, fp32 forward+
# backward, 1 CPU thread, side by side: chunk 32 took 0.081 s against 0.124 s for chunk 64.
CHUNK_SIZE = {"chunk": 32, "triton": 64}


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
    chunk_size: int | None = None,
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
        chunk_size: tokens per chunk of the chunked form; None: the backend's own (CHUNK_SIZE: 32 for
            "chunk", measured fastest on CPU with its sub-chunk backward; 64 for "triton"); a chunk never
            runs longer than T rounded up to a power of two.
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
    check_attention_values("gla", q.shape[1], scale=scale, k=k, v=v)
    check_linear_options("gla", q, v, initial_state, cu_seqlens, chunk_size)
    return run_linear(
        "gla", backend, _FUNCTIONS, (q, k, v, g), chunk_size=CHUNK_SIZE if chunk_size is None else chunk_size,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = [
    "gla",
    "gla_reference",
    "gla_chunk",
    "gla_recurrent",
    "gla_step",
    "gla_attention_matrix",
    "BACKENDS",
    "CHUNK_SIZE",
    "check_linear_options",
]
