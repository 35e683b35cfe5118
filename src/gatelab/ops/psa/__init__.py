"""Pyramid Sparse Attention: PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation
(Li et al., 2025)."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_attention_values, check_causal, check_qkv
from gatelab.ops.common.flex_blocks import routed_backend

from .flex import psa_flex
from .levels import LEVELS, psa_levels, pyramid, pyramid_mask
from .reference import psa_reference

BACKENDS = ("reference", "flex")
DEFAULT_BUDGET = (
    0.25,
    0.15,
    0.15,
    0.15,
)  # fractions of candidate key blocks at level 1, 2, 4, 8; rest skipped


def check_budget(budget) -> tuple[float, float, float, float]:
    if not isinstance(budget, tuple | list) or len(budget) != 4:
        raise ValueError(f"budget must be 4 fractions (level 1, 2, 4, 8), got {budget!r}")
    if any(not isinstance(f, int | float) or isinstance(f, bool) or not f >= 0 for f in budget):  # NaN too
        raise ValueError(f"budget fractions must be numbers >= 0, got {budget!r}")
    if budget[0] <= 0:
        raise ValueError(
            f"budget[0] (the fraction of key blocks kept at full resolution) must be > 0, got {budget!r}"
        )
    if sum(budget) > 1 + 1e-6:
        raise ValueError(f"budget fractions must sum to at most 1, got {budget!r} (sum {sum(budget):.4g})")
    return tuple(float(f) for f in budget)


def psa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    budget=DEFAULT_BUDGET,
    block_size_q: int = 1,
    block_size_k: int = 16,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Pyramid Sparse Attention: each (query block, key block) pair is seen at full resolution, through its
    2x / 4x / 8x mean-pooled keys and values, or not at all, by importance under ``budget``.

    A pooled key stands for the tokens it averages: its logit gets + log(count), so a block whose keys are
    equal within each group gives the same output at every level.

    Args:
        q: (B, Tq, H, D) queries.
        k: (B, S, Hkv, D) keys; H a multiple of Hkv (grouped-query attention).
        v: (B, S, Hkv, V) values.
        budget: (f1, f2, f4, f8) fractions of the candidate key blocks at level 1, 2, 4 and 8, most important
            first; the rest are skipped. (1, 0, 0, 0) is dense attention.
        block_size_q: queries sharing one level map. With 1 (the default) a query's levels depend only on
            itself and the keys before its block, so decoding reproduces the parallel pass.
        block_size_k: keys per block, a multiple of 8 so every pooled group stays inside its block.
        causal: mask future keys (bottom-right aligned when Tq < S); blocks the query block overlaps are full.
        scale: score scale, default D ** -0.5.
        backend: "reference" (dense fp32, autograd), "flex" (FlexAttention; no backward on CPU) or "auto"
            (flex on CUDA, reference on CPU, where flex has no backward).
    Returns:
        o: (B, Tq, H, V) in q's dtype.
    """
    check_qkv(q, k, v)
    budget = check_budget(budget)
    for name, value in (("block_size_q", block_size_q), ("block_size_k", block_size_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if block_size_k % 8:
        raise ValueError(
            f"block_size_k must be a multiple of 8 (the coarsest pooling level), got {block_size_k}"
        )
    check_causal("psa", causal, q, k)
    check_attention_values("psa", q.shape[1], scale=scale, causal=causal, k=k, v=v)
    name = routed_backend("psa", backend, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = psa_reference if name == "reference" else psa_flex
    return fn(
        q,
        k,
        v,
        budget=budget,
        block_size_q=block_size_q,
        block_size_k=block_size_k,
        causal=causal,
        scale=scale,
    )


__all__ = [
    "psa",
    "psa_levels",
    "pyramid",
    "pyramid_mask",
    "psa_reference",
    "check_budget",
    "LEVELS",
    "BACKENDS",
]
