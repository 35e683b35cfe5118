"""HER-Seg's linear attention, the definition: dense fp32 N x N weights over the flattened map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """phi = ELU + 1 (the code's ``self.elu(q) + 1.0``), in fp32."""
    return F.elu(x.float()) + 1.0


def rope_2d(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """HER-Seg's 2D rotary embedding on x (B, H, W, C), C divisible by 4, in fp32.

    Channel pairs (2p, 2p+1) are rotated as complex numbers; with k = C // 4 frequencies
    theta_j = base^(-j / k), pairs 0..k-1 turn by row * theta and pairs k..2k-1 by column * theta
    (the code's ``RoPE`` over the full channel width, before the split into heads).
    """
    B, H, W, C = x.shape
    k = C // 4
    theta = base ** (-torch.arange(k, device=x.device, dtype=torch.float32) / k)  # (k,)
    rows = torch.arange(H, device=x.device, dtype=torch.float32)[:, None, None] * theta  # (H, 1, k)
    cols = torch.arange(W, device=x.device, dtype=torch.float32)[None, :, None] * theta  # (1, W, k)
    angles = torch.cat([rows.expand(H, W, k), cols.expand(H, W, k)], dim=-1)  # (H, W, C/2)
    pairs = x.float().reshape(B, H, W, C // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).reshape(B, H, W, C)


def features(q, k, rope: bool, rope_base: float):
    """phi(q), phi(k) (B, H, W, h, D) and their rotated forms, fp32 (rotated = unrotated without rope)."""
    fq, fk = elu_features(q), elu_features(k)
    if not rope:
        return fq, fk, fq, fk
    B, H, W, heads, D = q.shape
    rot = lambda f: rope_2d(f.reshape(B, H, W, heads * D), rope_base).reshape(f.shape)  # noqa: E731
    return fq, fk, rot(fq), rot(fk)


def dual_gated_linear_weights(q, k, *, rope=True, rope_base=10000.0, eps=1e-6) -> torch.Tensor:
    """The equivalent attention matrix (B, h, N, N) in fp32: o_t = sum_s P[t, s] v_s.

    P[t, s] = RoPE(phi q_t) . RoPE(phi k_s) / N / (phi q_t . mean_s phi k_s + eps); with rope off the rows sum
    to 1 up to eps. With rope on, rows need not sum to 1 (the normaliser is left unrotated, as in the code).
    """
    fq, fk, rq, rk = (f.flatten(1, 2) for f in features(q, k, rope, rope_base))  # (B, N, h, D)
    N = fq.shape[1]
    A = torch.einsum("bthd,bshd->bhts", rq, rk) / N  # (B, h, N, N)
    z = torch.einsum("bthd,bhd->bht", fq, fk.mean(1))  # (B, h, N)
    return A / (z[..., None] + eps)


def dual_gated_linear_reference(q, k, v, *, rope=True, rope_base=10000.0, eps=1e-6) -> torch.Tensor:
    """q, k (B, H, W, h, D), v (B, H, W, h, V) -> (B, H, W, h, V) in q's dtype, from the dense weights."""
    P = dual_gated_linear_weights(q, k, rope=rope, rope_base=rope_base, eps=eps)
    o = torch.einsum("bhts,bshv->bthv", P, v.float().flatten(1, 2))  # (B, N, h, V)
    return o.reshape(*v.shape).to(q.dtype)
