"""Dynamic-kernel aggregation of OverLoCK's ContMix (OverLoCK: An Overview-first-Look-Closely-next ConvNet
with Context-Mixing Dynamic Kernels, CVPR 2025, arXiv 2502.20087): every pixel and head has its own K x K
kernel, applied over its neighbourhood with NATTEN's clamped windows (the code's ``na2d_av``).

    o[i, j] = sum_(a, b) taps[i, j, a * K + b] * v[s(i) + a, s(j) + b],   s(i) = clamp(i - K // 2, 0, L - K)

The windows are those of gatelab.ops.neighborhood (kernel K, stride 1, dilation 1, not causal): the
reference scatters the taps into its dense neighbourhood mask.
"""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_same, check_tensor
from gatelab.ops.neighborhood import normalize_args
from gatelab.ops.neighborhood.masks import neighborhood_mask

BACKENDS = ("reference", "gather")


def contmix_reference(taps: torch.Tensor, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The definition in fp32: the taps scattered into dense (N, N) weights on the neighbourhood mask, whose
    True keys of each query are its K x K window in row-major order, the order of the taps."""
    B, H, W, G, V = v.shape
    N = H * W
    mask = neighborhood_mask((H, W), (kernel_size,) * 2, (1, 1), (1, 1), (False, False), device=v.device)
    dense = taps.new_zeros(B, G, N, N, dtype=torch.float32).masked_scatter(
        mask, taps.float().permute(0, 3, 1, 2, 4).reshape(B, G, N, kernel_size**2)
    )  # (B, G, N, N)
    o = torch.einsum("bgts,bsgv->btgv", dense, v.float().reshape(B, N, G, V))
    return o.reshape(B, H, W, G, V).to(v.dtype)


def window_indices(L: int, kernel_size: int, device) -> torch.Tensor:
    """(L, K) key coordinate of each tap along one axis: NATTEN's clamped window s(i) + a."""
    start = (torch.arange(L, device=device) - kernel_size // 2).clamp(0, L - kernel_size)
    return start[:, None] + torch.arange(kernel_size, device=device)


def contmix_gather(taps: torch.Tensor, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """One gather of every pixel's K x K window, (B, H, W, K, K, G, V), then a weighted sum over the taps."""
    B, H, W, G, V = v.shape
    K = kernel_size
    rows, cols = window_indices(H, K, v.device), window_indices(W, K, v.device)
    windows = v[:, rows[:, None, :, None], cols[None, :, None, :]]  # (B, H, W, K, K, G, V)
    return torch.einsum("bhwgk,bhwkgv->bhwgv", taps.to(v.dtype), windows.flatten(3, 4))


_FUNCTIONS = {"reference": contmix_reference, "gather": contmix_gather}


def contmix(taps: torch.Tensor, v: torch.Tensor, *, kernel_size: int, backend: str = "auto") -> torch.Tensor:
    """Apply per-pixel, per-head kernels over clamped K x K neighbourhoods.

    Args:
        taps: (B, H, W, G, K * K) kernel weights per pixel and head, taps in row-major order (softmaxed by
            the caller in ContMix, but any weights are taken).
        v: (B, H, W, G, V) values.
        kernel_size: K, odd or even, at most min(H, W).
        backend: "reference" (dense fp32 on the neighbourhood mask), "gather", or "auto" (gather).
    Returns:
        o: (B, H, W, G, V) in v's dtype.
    """
    check_tensor("v", v, 5, "(B, H, W, G, V)")
    check_tensor("taps", taps, 5, "(B, H, W, G, K * K)")
    check_same("v", v, taps=taps)
    normalize_args(tuple(v.shape[1:3]), kernel_size, 1, 1, False)  # K <= H, W with NATTEN's error
    if taps.shape != (*v.shape[:4], kernel_size**2):
        raise ValueError(
            f"taps must have shape (B, H, W, G, K * K) = {(*v.shape[:4], kernel_size**2)}, got {tuple(taps.shape)}"
        )
    name = resolve_backend("contmix", backend, {n: True for n in BACKENDS}, ("gather",))
    return _FUNCTIONS[name](taps, v, kernel_size)


__all__ = ["contmix", "contmix_reference", "contmix_gather", "window_indices", "BACKENDS"]
