"""Hierarchically Pruned Attention: A Training-Free Sub-quadratic Cost Transformer Model Serving Framework
With Hierarchically Pruned Attention (Lee et al., 2024)."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_attention_values, check_causal, check_qkv
from gatelab.ops.common.flex_blocks import routed_backend

from .flex import hip_flex
from .mask import hip_select, token_mask
from .reference import hip_reference

BACKENDS = ("reference", "flex")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def hip(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: int = 8,
    block_size_q: int = 1,
    block_size_k: int = 16,
    sinks: int = 4,
    window: int = 16,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """HiP attention: each query block sees its ``topk`` best key blocks (found by hierarchical halving and
    re-scoring), the first ``sinks`` keys and a local ``window``; softmax over that union.

    Args:
        q: (B, Tq, H, D) queries.
        k: (B, S, Hkv, D) keys; H a multiple of Hkv (grouped-query attention).
        v: (B, S, Hkv, V) values.
        topk: key blocks kept per query block. With topk >= ceil(S / block_size_k) every block is kept and
            HiP is dense attention.
        block_size_q: queries sharing one mask. With 1 (the default) a query's mask depends only on itself
            and the keys up to it, so decoding with a KV cache reproduces the parallel pass; larger blocks are
            cheaper but let the later queries of a block influence the earlier ones' mask.
        block_size_k: keys per block.
        sinks: the first ``sinks`` keys are always visible (0: none).
        window: keys within ``window`` positions of the query are always visible (0: none).
        causal: mask future keys, bottom-right aligned when Tq < S (decoding).
        scale: score scale, default D ** -0.5.
        backend: "reference" (dense fp32, autograd), "flex" (FlexAttention; no backward on CPU) or "auto"
            (flex on CUDA, reference on CPU, where flex has no backward; both compute the same function).
    Returns:
        o: (B, Tq, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    _check_int("topk", topk, 1)
    _check_int("block_size_q", block_size_q, 1)
    _check_int("block_size_k", block_size_k, 1)
    _check_int("sinks", sinks, 0)
    _check_int("window", window, 0)
    check_causal("hip", causal, q, k)
    check_attention_values("hip", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    name = routed_backend("hip", backend, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = hip_reference if name == "reference" else hip_flex
    return fn(
        q,
        k,
        v,
        topk=topk,
        block_size_q=block_size_q,
        block_size_k=block_size_k,
        sinks=sinks,
        window=window,
        causal=causal,
        scale=scale,
    )


__all__ = ["hip", "hip_select", "token_mask", "hip_reference", "BACKENDS"]
