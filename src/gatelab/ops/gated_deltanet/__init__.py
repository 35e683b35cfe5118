"""Gated DeltaNet: the delta rule with a scalar decay gate (Gated Delta Networks: Improving Mamba2 with
Delta Rule, Yang et al., 2024). S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import (
    check_attention_values,
    check_cu_seqlens,
    check_head_dims,
    check_heads,
    check_log_gate,
    check_same,
    check_tensor,
)
from gatelab.ops.common.linear import run_linear

from .chunk import gated_deltanet_chunk
from .recurrent import gated_deltanet_recurrent, gated_deltanet_step
from .reference import gated_deltanet_attention_matrix, gated_deltanet_reference

_FUNCTIONS = {
    "reference": gated_deltanet_reference,
    "chunk": gated_deltanet_chunk,
    "recurrent": gated_deltanet_recurrent,
    "triton": None,
}
BACKENDS = tuple(_FUNCTIONS)
GATE_DTYPES = (torch.float32,)  # gates may stay fp32 when q/k/v are half precision


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size, check_values: bool = True) -> None:
    layout = "(B, T, H, D)"
    check_tensor("q", q, 4, layout)
    check_tensor("k", k, 4, layout)
    check_tensor("v", v, 4, "(B, T, H, V)")
    check_same("q", q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, T, H, K) {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if q.shape[1] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_heads(H)
    check_head_dims(q, v)
    for name, x in (("g", g), ("beta", beta)):
        check_tensor(name, x, 3, "(B, T, H)")
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (B, T, H) = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move them to one device")
        if x.dtype != q.dtype and x.dtype not in GATE_DTYPES:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}) or float32, got {x.dtype}")
    check_log_gate("g", g.detach(), check_values)
    if check_values and not torch.compiler.is_compiling() and beta.numel():
        low, high = float(beta.detach().min()), float(beta.detach().max())
        if not (low >= 0 and high <= 1):  # also false for NaN
            raise ValueError(
                f"beta must lie in [0, 1] (e.g. a sigmoid), got values in [{low:.4g}, {high:.4g}]"
            )
    check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "(B, H, K, V)")
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        expected = (n, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must have shape (B, H, K, V) = {expected}, got {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(
                f"initial_state is on {initial_state.device} but q is on {q.device}; move them to one device"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def gated_deltanet(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale q_t S_t.

    Args:
        q: (B, T, H, K) queries.
        k: (B, T, H, K) keys; the rule assumes unit-norm keys (the mixer L2-normalises q and k, or pass
            ``use_qk_l2norm=True``); with larger keys I - beta k k^T can amplify the state.
        v: (B, T, H, V) values.
        g: (B, T, H) log decay, alpha_t = exp(g_t); must be <= 0. q's dtype or float32.
        beta: (B, T, H) write strength in [0, 1]. q's dtype or float32.
        scale: query scale, default K ** -0.5.
        initial_state: (B, H, K, V) state before the first token (one per sequence with cu_seqlens).
        output_final_state: also return the state after the last token.
        cu_seqlens: (N+1,) int offsets of packed sequences in a (1, T, ...) batch; each starts from its own
            initial state (zero if none).
        chunk_size: tokens per chunk for the chunk (and triton) backends.
        use_qk_l2norm: L2-normalise q and k over the last dim first.
        backend: "reference" (token loop of the paper's equation, fp32), "chunk" (WY / UT chunkwise form,
            fp32 inside), "recurrent" (delta-rule step loop, what decoding uses), "triton", or "auto"
            (triton when available, else chunk).
    Returns:
        o: (B, T, H, V) in q's dtype, and the final state (B, H, K, V) (N, H, K, V with cu_seqlens) in
        float32, or None unless ``output_final_state``.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    check_attention_values("gated_deltanet", q.shape[1], scale=scale, k=k, v=v)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return run_linear(
        "gated_deltanet", backend, _FUNCTIONS, (q, k, v, g, beta), chunk_size=chunk_size, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = [
    "gated_deltanet",
    "gated_deltanet_reference",
    "gated_deltanet_chunk",
    "gated_deltanet_recurrent",
    "gated_deltanet_step",
    "gated_deltanet_attention_matrix",
    "l2_normalize",
    "BACKENDS",
]
