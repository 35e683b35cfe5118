"""Shifted-window retention with Manhattan decay, width then height (Gated-SwinRMT, arXiv 2604.06014;
the retention of RMT: Retentive Networks Meet Vision Transformers, 2024).

No public code exists for Gated-SwinRMT; this follows the abstract: inside (shifted) windows,
softmax(Q K^T / sqrt(d) + log D) with D = gamma^(|dx| + |dy|), decomposed into a pass along the width and
one along the height as RMT's decomposed manhattan self-attention."""

from __future__ import annotations

import torch

from gatelab.ops.common.backend import resolve_backend
from gatelab.ops.common.checks import check_choice, check_map_qkv, check_tensor

from .reference import axis_labels, axis_layout, manhattan_log_decay, swin_retention_reference
from .windows import swin_retention_windows, window_partition, window_reverse

BACKENDS = ("reference", "sdpa")
MODES = ("axial", "full")
_FUNCTIONS = {"reference": swin_retention_reference, "sdpa": swin_retention_windows}


def _pair(name: str, value) -> tuple[int, int]:
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, tuple | list)
        or len(values) != 2
        or any(not isinstance(v, int) or isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"gated_swin_rmt: {name} must be an int or two ints (height, width), got {value!r}")
    return tuple(values)


def gated_swin_rmt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    *,
    window_size: int | tuple[int, int] = 7,
    shift_size: int | tuple[int, int] = 0,
    mode: str = "axial",
    backend: str = "auto",
) -> torch.Tensor:
    """Retention inside (shifted) windows with the Manhattan decay as an additive log D.

    The map is padded at the bottom and right to whole windows and rolled by -shift (Swin); a query sees
    the keys of its window and Swin region on the real map. An axis no longer than the window is one
    window, unshifted.

    Args:
        q, k: (B, H, W, h, D); v (B, H, W, h, V).
        log_gamma: (h,) log of each head's decay gamma in (0, 1], so <= 0.
        window_size: window (height, width) or one int; shift_size: the roll, 0 <= shift < window.
        mode: "axial" (width then height, RMT's decomposed form) or "full" (one 2D pass).
        backend: "reference" (dense fp32 over the whole map), "sdpa" (windows), or "auto" (sdpa).
    Returns:
        o: (B, H, W, h, V) in q's dtype.
    """
    check_map_qkv(q, k, v)
    check_tensor("log_gamma", log_gamma, 1, "(h,)")
    if log_gamma.shape != (q.shape[3],):
        raise ValueError(f"log_gamma must have shape (h,) = ({q.shape[3]},), got {tuple(log_gamma.shape)}")
    if not bool((log_gamma <= 0).all()):
        raise ValueError("log_gamma must be <= 0 (a decay gamma in (0, 1]), got a positive entry")
    window_size, shift_size = _pair("window_size", window_size), _pair("shift_size", shift_size)
    if any(w < 1 for w in window_size) or any(not 0 <= s < w for s, w in zip(shift_size, window_size)):
        raise ValueError(
            f"gated_swin_rmt: window_size must be >= 1 and 0 <= shift_size < window_size, got window {window_size}, "
            f"shift {shift_size}"
        )
    check_choice("mode", mode, MODES)
    name = resolve_backend("gated_swin_rmt", backend, {n: True for n in BACKENDS}, ("sdpa",))
    return _FUNCTIONS[name](q, k, v, log_gamma, window_size=window_size, shift_size=shift_size, mode=mode)


__all__ = [
    "gated_swin_rmt",
    "swin_retention_reference",
    "swin_retention_windows",
    "manhattan_log_decay",
    "axis_labels",
    "axis_layout",
    "window_partition",
    "window_reverse",
    "BACKENDS",
    "MODES",
]
