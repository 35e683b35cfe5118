"""Causal sliding-window attention with attention sinks (Longformer, Beltagy et al., 2020; Efficient
Streaming Language Models with Attention Sinks, Xiao et al., 2024): a query sees the last ``window`` keys up
to itself and the first ``sinks`` keys of the sequence. Reuses the softmax op's reference and SDPA paths and
adds a FlexAttention path with a block mask cached per shape."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_attention_values, check_qkv
from gatelab.ops.common.flex import check_flex_inputs, default_compile, flex_supported, flex_usable
from gatelab.ops.softmax import check_attention_options
from gatelab.ops.softmax.reference import softmax_reference
from gatelab.ops.softmax.sdpa import softmax_sdpa

from .flex import sliding_window_flex

BACKENDS = ("reference", "sdpa", "flex")


def sliding_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal sliding-window attention with sinks.

    Args:
        q: (B, Tq, H, D) queries; with Tq < S they are the last Tq positions (bottom-right aligned, decoding).
        k: (B, S, Hkv, D) keys; H a multiple of Hkv (grouped-query attention).
        v: (B, S, Hkv, V) values.
        window: a query at position p sees keys in (p - window, p]; int >= 1.
        sinks: the first ``sinks`` keys are always visible (up to the query itself).
        scale: score scale, default D ** -0.5.
        backend: "reference" (fp32 dense), "sdpa" (dense bool mask), "flex" (FlexAttention, forward only on
            CPU) or "auto" (flex where it runs and pays off, else sdpa).
    Returns:
        o: (B, Tq, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    if not isinstance(window, int) or isinstance(window, bool):
        raise ValueError(f"window must be a positive int, got {window!r}")
    check_attention_options(q, k, True, window, sinks)
    check_attention_values("sliding_window", q.shape[1], scale=scale, k=k, v=v)
    prefer_flex = flex_usable(q, k, v) and default_compile(q, k.shape[1])
    name = resolve_backend(
        "sliding_window",
        backend,
        {"reference": True, "sdpa": True, "flex": flex_supported()},
        ("flex", "sdpa") if prefer_flex else ("sdpa",),
    )
    if name == "flex":
        check_flex_inputs("sliding_window", q, k, v)
        return sliding_window_flex(q, k, v, window=window, sinks=sinks, scale=scale)
    fn = softmax_reference if name == "reference" else softmax_sdpa
    return fn(q, k, v, causal=True, scale=scale, window=window, sinks=sinks)


__all__ = ["sliding_window", "BACKENDS"]
