"""Neighborhood attention in 1D, 2D and 3D with NATTEN's kernel size, stride, dilation and causal
semantics (Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light,
Hassani et al., 2025; Neighborhood Attention Transformer, Hassani et al., 2023)."""

from __future__ import annotations

import math

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import (
    check_attention_values,
    check_head_dims,
    check_heads,
    check_same,
    check_tensor,
)
from gatelab.ops.common.flex import check_flex_inputs, default_compile, flex_supported, flex_usable

from .flex import neighborhood_flex
from .masks import neighborhood_mask, visible_1d
from .reference import full_mask, neighborhood_probs, neighborhood_reference, neighborhood_sdpa

BACKENDS = ("reference", "sdpa", "flex")


def _per_dim(name: str, value, n: int, kind=int) -> tuple:
    values = (
        (value,) * n if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else value
    )
    if not isinstance(values, tuple | list) or len(values) != n:
        raise ValueError(
            f"{name} must be a {kind.__name__} or a tuple of {n} (one per spatial dim), got {value!r}"
        )
    for x in values:
        if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
            raise TypeError(f"{name} must hold {kind.__name__}s, got {value!r}")
    return tuple(values)


def normalize_args(spatial, kernel_size, stride, dilation, causal):
    """Per-dimension tuples, checked against the map as NATTEN checks them."""
    n = len(spatial)
    kernel_size = _per_dim("kernel_size", kernel_size, n)
    stride = _per_dim("stride", stride, n)
    dilation = _per_dim("dilation", dilation, n)
    causal = _per_dim("causal", causal, n, bool)
    for i, (L, k, s, d) in enumerate(zip(spatial, kernel_size, stride, dilation)):
        if k < 1:
            raise ValueError(f"kernel_size must be >= 1 in every dim, got {kernel_size}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 in every dim, got {dilation}")
        if s < 1:
            raise ValueError(f"stride must be >= 1 in every dim, got {stride}")
        if s > k:
            raise ValueError(
                f"stride cannot be larger than kernel_size (dim {i}): got stride {stride}, kernel_size {kernel_size}"
            )
        if k * d > L:
            raise ValueError(
                f"kernel_size * dilation cannot exceed the input size (dim {i}): got kernel_size {kernel_size}, "
                f"dilation {dilation}, spatial size {tuple(spatial)}"
            )
    return kernel_size, stride, dilation, causal


def check_inputs(q, k, v, extra_k, extra_v) -> tuple[int, ...]:
    check_tensor("q", q, (4, 5, 6), "(B, *spatial, H, D) with 1 to 3 spatial dims")
    check_tensor("k", k, q.ndim, "(B, *spatial, Hkv, D), as q")
    check_tensor("v", v, q.ndim, "(B, *spatial, Hkv, V), as q")
    check_same("q", q, k=k, v=v, additional_keys=extra_k, additional_values=extra_v)
    spatial = tuple(q.shape[1:-2])
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"q, k and v must share (B, *spatial) and k, v their heads: got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_heads(q.shape[-2], k.shape[-2])
    check_head_dims(q, v)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if extra_k is not None:
        check_tensor("additional_keys", extra_k, 4, "(B, X, Hkv, D)")
        check_tensor("additional_values", extra_v, 4, "(B, X, Hkv, V)")
        want_k = (q.shape[0], extra_k.shape[1], k.shape[-2], k.shape[-1])
        want_v = (q.shape[0], extra_k.shape[1], v.shape[-2], v.shape[-1])
        if tuple(extra_k.shape) != want_k or tuple(extra_v.shape) != want_v:
            raise ValueError(
                f"additional_keys/values must be (B, X, Hkv, D) {want_k} and (B, X, Hkv, V) {want_v}, "
                f"got {tuple(extra_k.shape)} and {tuple(extra_v.shape)}"
            )
    return spatial


def neighborhood(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighborhood attention over a 1D, 2D or 3D map.

    Args:
        q: (B, *spatial, H, D) queries, 1 to 3 spatial dims (a sequence, an image, a video).
        k: (B, *spatial, Hkv, D) keys; H a multiple of Hkv (grouped-query attention).
        v: (B, *spatial, Hkv, V) values.
        kernel_size, stride, dilation: ints or one per spatial dim; stride <= kernel_size,
            kernel_size * dilation <= spatial size. stride == kernel_size gives blocked attention.
        causal: a bool or one per dim (NATTEN's is_causal).
        scale: score scale, default D ** -0.5.
        additional_keys: (B, X, Hkv, D) global keys that every query also sees; additional_values (B, X, Hkv, V).
        backend: "reference" (fp32 dense), "sdpa" (dense bool mask), "flex" (FlexAttention, forward only on
            CPU) or "auto" (flex where it runs and pays off, else sdpa).
    Returns:
        o: (B, *spatial, H, V) in q's dtype.
    """
    spatial = check_inputs(q, k, v, additional_keys, additional_values)
    kernel_size, stride, dilation, causal = normalize_args(spatial, kernel_size, stride, dilation, causal)
    N = math.prod(spatial)
    # causal in any dim: every token but the first (0 in every dim) is checked; with a 1D map these are the
    # future tokens, with some dims causal a superset (tokens at 0 in every causal dim are never future)
    flat = {name: x.flatten(1, len(spatial)) for name, x in (("k", k), ("v", v))}
    check_attention_values("neighborhood", N, scale=scale, causal=any(causal), **flat)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v, additional_keys, additional_values)
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]
    prefer_flex = flex_usable(*tensors) and default_compile(q.flatten(1, len(spatial)), N + n_extra)
    name = resolve_backend(
        "neighborhood",
        backend,
        {"reference": True, "sdpa": True, "flex": flex_supported()},
        ("flex", "sdpa") if prefer_flex else ("sdpa",),
    )
    if name == "flex":
        check_flex_inputs("neighborhood", *tensors)
        return neighborhood_flex(
            q, k, v, spatial=spatial, kernel_size=kernel_size, stride=stride, dilation=dilation,
            causal=causal, scale=scale, extra_k=additional_keys, extra_v=additional_values,
        )  # fmt: skip
    mask = full_mask(spatial, kernel_size, stride, dilation, causal, n_extra, q.device)  # (N, N + X)
    qf, kf, vf = (t.flatten(1, len(spatial)) for t in (q, k, v))  # (B, N, H, D)
    if n_extra:
        kf, vf = torch.cat([kf, additional_keys], dim=1), torch.cat([vf, additional_values], dim=1)
    fn = neighborhood_reference if name == "reference" else neighborhood_sdpa
    o = fn(qf, kf, vf, mask, scale)  # (B, N, H, V)
    return o.reshape(*q.shape[:-1], v.shape[-1])


__all__ = [
    "neighborhood",
    "neighborhood_mask",
    "neighborhood_probs",
    "normalize_args",
    "visible_1d",
    "full_mask",
    "BACKENDS",
]
