"""Gated softmax attention: softmax attention whose output is modulated by a query-dependent gate, G1 of
"Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free"
(Qiu et al., 2025), as used in Qwen3-Next."""

from __future__ import annotations

import importlib.util

import torch

from gatelab.ops.common.backend import resolve_backend, triton_available
from gatelab.ops.common.checks import (
    check_attention_values,
    check_choice,
    check_qkv,
    check_same,
    check_tensor,
)
from gatelab.ops.softmax import check_attention_options

from .reference import COMBINES, GATE_FUNCTIONS, apply_gate, gate_activation, gated_softmax_reference
from .sdpa import gated_softmax_sdpa

BACKENDS = ("reference", "sdpa", "triton")


def _has_triton_kernel() -> bool:
    return importlib.util.find_spec(f"{__name__}.triton") is not None


def gated_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    gate_fn: str = "sigmoid",
    combine: str = "multiply",
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention followed by a gate on each head's output: o = attn(q, k, v) * act(gate).

    Args:
        q: (B, T, H, D) queries.
        k: (B, S, Hkv, D) keys (H a multiple of Hkv: GQA).
        v: (B, S, Hkv, V) values.
        gate: (B, T, H, V) gate logits (elementwise) or (B, T, H, 1) (headwise: one scalar per head).
        causal: causal mask, bottom-right aligned when T < S.
        scale: score scale, default D ** -0.5.
        gate_fn: "sigmoid" (default), "silu", or "ns_sigmoid" (0.5 + 0.5 * sigmoid).
        combine: "multiply" (default) or "add" (o + act(gate)).
        backend: "reference", "sdpa", "triton" (CUDA; multiply with sigmoid/SiLU), or "auto".
    Returns:
        o: (B, T, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    check_attention_options(q, k, causal, None, 0)
    check_tensor("gate", gate, 4, "(B, T, H, V) or (B, T, H, 1)")
    check_same("q", q, gate=gate)
    B, T, H = q.shape[:3]
    if gate.shape[:3] != (B, T, H) or gate.shape[3] not in (1, v.shape[3]):
        raise ValueError(
            f"gate must have shape (B, T, H, V)={(B, T, H, v.shape[3])} (elementwise) or (B, T, H, 1) "
            f"(headwise), got {tuple(gate.shape)}"
        )
    check_choice("gate_fn", gate_fn, GATE_FUNCTIONS)
    check_choice("combine", combine, COMBINES)
    check_attention_values("gated_softmax", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    triton_ok = lambda: (  # noqa: E731
        combine == "multiply"
        and gate_fn in ("sigmoid", "silu")
        and triton_available(q)
        and _has_triton_kernel()
    )
    name = resolve_backend(
        "gated_softmax", backend, {"reference": True, "sdpa": True, "triton": triton_ok}, ("triton", "sdpa")
    )
    if name == "triton":
        from .triton import gated_softmax_triton

        return gated_softmax_triton(q, k, v, gate, causal=causal, scale=scale, gate_fn=gate_fn)
    fn = gated_softmax_reference if name == "reference" else gated_softmax_sdpa
    return fn(q, k, v, gate, causal=causal, scale=scale, gate_fn=gate_fn, combine=combine)


__all__ = ["gated_softmax", "apply_gate", "gate_activation", "GATE_FUNCTIONS", "COMBINES", "BACKENDS"]
