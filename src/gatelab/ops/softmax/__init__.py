"""Softmax attention (Attention Is All You Need, Vaswani et al., 2017): causal or bidirectional, GQA,
optional sliding window and attention sinks."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_attention_values, check_qkv

from .reference import apply_probs, attention_probs, softmax_reference
from .sdpa import softmax_sdpa

BACKENDS = ("reference", "sdpa")


def check_attention_options(q, k, causal: bool, window: int | None, sinks: int) -> None:
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(
            f"causal attention needs at least as many keys as queries (keys are bottom-right aligned), "
            f"got {q.shape[1]} queries and {k.shape[1]} keys"
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")


def softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    sinks: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention.

    Args:
        q: (B, Tq, H, D) queries.
        k: (B, S, Hkv, D) keys; H must be a multiple of Hkv (grouped-query attention).
        v: (B, S, Hkv, V) values.
        causal: mask future keys (bottom-right aligned when Tq < S, as for decoding with a cache).
        scale: score scale, default D ** -0.5.
        window: if given, a query sees only the last ``window`` keys up to itself.
        sinks: the first ``sinks`` keys are always visible.
        backend: "reference" (fp32 dense), "sdpa", or "auto".
    Returns:
        o: (B, Tq, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    check_attention_options(q, k, causal, window, sinks)
    check_attention_values("softmax", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    name = resolve_backend("softmax", backend, {"reference": True, "sdpa": True}, ("sdpa",))
    fn = softmax_reference if name == "reference" else softmax_sdpa
    return fn(q, k, v, causal=causal, scale=scale, window=window, sinks=sinks)


__all__ = ["softmax", "attention_probs", "apply_probs", "BACKENDS", "check_attention_options"]
