"""Linear attention with a fixed per-head exponential decay: Lightning Attention (TransNormerLLM (Qin et al.,
2023); Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models
(Qin et al., 2024))."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_attention_values, check_log_gate, check_qkv, check_tensor
from gatelab.ops.common.linear import check_linear_options, run_linear

from .chunk import lightning_chunk
from .recurrent import lightning_recurrent, lightning_step
from .reference import alibi_slopes, expand_decay, lightning_attention_matrix, lightning_reference

_FUNCTIONS = {
    "reference": lightning_reference,
    "chunk": lightning_chunk,
    "recurrent": lightning_recurrent,
    "triton": None,
}
BACKENDS = tuple(_FUNCTIONS)


def lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with a scalar decay per head: S_t = exp(decay_t) S_{t-1} + k_t^T v_t,
    o_t = scale * q_t S_t.

    Args:
        q, k: (B, T, H, K) queries and keys.
        v: (B, T, H, V) values.
        decay: log decay (<= 0), fixed per head (H,) (Lightning: -alibi_slopes(H)) or per token (B, T, H).
        scale: query scale, default K ** -0.5 (TransNormerLLM uses 1.0).
        initial_state: (B, H, K, V) state to start from (fp32), or (N, H, K, V) with cu_seqlens.
        output_final_state: also return the final state (B, H, K, V) fp32 (or (N, H, K, V)).
        cu_seqlens: (N+1,) int offsets of packed sequences in a (1, T, ...) batch; each starts afresh.
        chunk_size: tokens per block of the chunked form (at most T rounded up to a power of two).
        backend: "reference" (fp32 loop), "chunk", "recurrent", "triton" (CUDA), or "auto".
    Returns:
        o: (B, T, H, V) in q's dtype, and the final state or None.
    """
    H, Hkv = check_qkv(q, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"lightning: k and v must have as many heads as q ({H}), got {Hkv}")
    check_tensor("decay", decay, (1, 3), "(H,) or (B, T, H)")
    if tuple(decay.shape) not in ((H,), tuple(q.shape[:3])):
        raise ValueError(
            f"decay must have shape (H,) = ({H},) or (B, T, H) = {tuple(q.shape[:3])}, got {tuple(decay.shape)}"
        )
    if decay.device != q.device:
        raise ValueError(f"decay is on {decay.device} but q is on {q.device}; move them to one device")
    check_log_gate("decay", decay.detach())
    check_attention_values("lightning", q.shape[1], scale=scale, k=k, v=v)
    check_linear_options("lightning", q, v, initial_state, cu_seqlens, chunk_size)
    if cu_seqlens is not None:
        decay = expand_decay(decay, q)  # (B, T, H): cut along T with q, k, v
    return run_linear(
        "lightning", backend, _FUNCTIONS, (q, k, v, decay), chunk_size=chunk_size, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = [
    "lightning",
    "lightning_reference",
    "lightning_chunk",
    "lightning_recurrent",
    "lightning_step",
    "lightning_attention_matrix",
    "alibi_slopes",
    "expand_decay",
    "BACKENDS",
]
