"""HER-Seg's linear attention on (B, H, W) maps: ELU + 1 features, a 2D rotary embedding on the
numerator only, and division by the unrotated normaliser (code github.com/xq141839/HER-Seg,
``SAM/LGViT.py``, ``LinearAttention``)."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_map_qkv

from .reference import dual_gated_linear_reference, dual_gated_linear_weights, features, rope_2d

BACKENDS = ("reference", "matmul")


def dual_gated_linear_matmul(q, k, v, *, rope=True, rope_base=10000.0, eps=1e-6) -> torch.Tensor:
    """The matmul form, O(N D V): kv = sum_s RoPE(phi k_s)^T v_s / N first, then each query reads it."""
    fq, fk, rq, rk = (f.flatten(1, 2) for f in features(q, k, rope, rope_base))  # (B, N, h, D)
    vf = v.float().flatten(1, 2)  # (B, N, h, V)
    N = fq.shape[1]
    kv = torch.einsum("bshd,bshv->bhdv", rk, vf) / N  # (B, h, D, V)
    z = torch.einsum("bthd,bhd->bth", fq, fk.mean(1))  # (B, N, h)
    o = torch.einsum("bthd,bhdv->bthv", rq, kv) / (z[..., None] + eps)
    return o.reshape(*v.shape).to(q.dtype)


_FUNCTIONS = {"reference": dual_gated_linear_reference, "matmul": dual_gated_linear_matmul}


def dual_gated_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: bool = True,
    rope_base: float = 10000.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional linear attention over a map.

        o_t = RoPE(phi q_t) (sum_s RoPE(phi k_s)^T v_s / N) / (phi q_t . mean_s phi k_s + eps),  phi = ELU + 1

    The rotary embedding turns channel pairs by row and column (:func:`rope_2d`) over the h * D channels of
    all heads together, as the code applies it before splitting the heads; the normaliser is not rotated.

    Args:
        q, k: (B, H, W, h, D) queries and keys before the feature map.
        v: (B, H, W, h, V) values.
        rope: the 2D rotary embedding (needs h * D divisible by 4); False gives plain linear attention.
        rope_base: the rotary base.
        eps: added to the normaliser.
        backend: "reference" (dense fp32 N x N), "matmul", or "auto" (matmul).
    Returns:
        o: (B, H, W, h, V) in q's dtype.
    """
    check_map_qkv(q, k, v)
    if not isinstance(rope, bool):
        raise TypeError(f"dual_gated_linear: rope must be a bool, got {type(rope).__name__}")
    if rope and (q.shape[-2] * q.shape[-1]) % 4:
        raise ValueError(
            f"dual_gated_linear: rope needs h * D divisible by 4 (two axes of channel pairs), got "
            f"{q.shape[-2]} * {q.shape[-1]}"
        )
    if not isinstance(eps, int | float) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"dual_gated_linear: eps must be a number >= 0, got {eps!r}")
    name = resolve_backend("dual_gated_linear", backend, {n: True for n in BACKENDS}, ("matmul",))
    return _FUNCTIONS[name](q, k, v, rope=rope, rope_base=float(rope_base), eps=float(eps))


__all__ = [
    "dual_gated_linear",
    "dual_gated_linear_reference",
    "dual_gated_linear_matmul",
    "dual_gated_linear_weights",
    "rope_2d",
    "BACKENDS",
]
