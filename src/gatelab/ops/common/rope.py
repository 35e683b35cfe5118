"""Rotary position embedding (RoFormer, Su et al., 2021), half-split layout as in LLaMA/Qwen."""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32; an odd last channel is left unrotated."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions (T,), (B, T) or per head (B, T, H). Computed in fp32, returned
    in x's dtype."""
    half = inv_freq.shape[0]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (T | B, T | B, T, H, D/2)
    if angles.ndim == 2:
        angles = angles[None]
    if angles.ndim == 3:
        angles = angles[:, :, None, :]  # (B|1, T, 1, D/2): one position for every head
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)
