"""Windowed retention with Manhattan decay, the definition: dense fp32 N x N scores over the whole map,
masked to each token's shifted window (and its Swin region), with the decay added as log D."""

from __future__ import annotations

import torch


def axis_layout(L: int, window: int, shift: int) -> tuple[int, int]:
    """(window, shift) along an axis of length L: an axis no longer than the window is one window and is
    not shifted (as Swin does for small maps)."""
    if L <= window:
        return L, 0
    return window, shift


def axis_labels(L: int, window: int, shift: int, device=None) -> torch.Tensor:
    """(L,) int label per coordinate of the unpadded axis: two tokens may attend along this axis iff their
    labels agree. The axis is padded to a multiple of the window and rolled by -shift (Swin); a label is the
    token's window there, and whether it was rolled round from the start (Swin's region mask)."""
    window, shift = axis_layout(L, window, shift)
    padded = -(-L // window) * window
    i = torch.arange(L, device=device)
    rolled = (i - shift) % padded
    return 2 * (rolled // window) + (i < shift).long()


def distances(L: int, device=None) -> torch.Tensor:
    """(L, L) |i - j|."""
    i = torch.arange(L, device=device)
    return (i[:, None] - i[None, :]).abs()


def manhattan_log_decay(H: int, W: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """(h, N, N) log D over the row-major map, log D[t, s] = (|dy| + |dx|) log gamma: 0 at distance 0, and
    D = gamma^|dy| * gamma^|dx| factorises over the axes."""
    dy = distances(H, log_gamma.device)[:, None, :, None]  # (H, 1, H, 1)
    dx = distances(W, log_gamma.device)[None, :, None, :]  # (1, W, 1, W)
    manhattan = (dy + dx).reshape(H * W, H * W).float()
    return log_gamma.float()[:, None, None] * manhattan


def _masked_softmax_apply(q, k, v, bias, mask, scale):
    """q, k (B, N, h, D), v (B, N, h, V), bias (h, N, N), mask (N, N) -> (B, N, h, V) fp32."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale + bias
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshv->bthv", p, v)


def swin_retention_reference(q, k, v, log_gamma, *, window_size, shift_size, mode="axial"):
    """q, k (B, H, W, h, D), v (B, H, W, h, V), log_gamma (h,) <= 0 -> (B, H, W, h, V) in q's dtype.

    mode "axial": retention along the width inside each window row, then along the height on its output
    (decay gamma^|dx|, then gamma^|dy|); "full": one 2D retention with gamma^(|dx| + |dy|).
    """
    B, H, W, h, D = q.shape
    (wh, ww), (sh, sw) = window_size, shift_size
    dev = q.device
    row = torch.arange(H, device=dev).repeat_interleave(W)  # (N,)
    col = torch.arange(W, device=dev).repeat(H)
    lab_h, lab_w = axis_labels(H, wh, sh, dev)[row], axis_labels(W, ww, sw, dev)[col]
    same_h = lab_h[:, None] == lab_h[None, :]  # (N, N): same window and region along the height
    same_w = lab_w[:, None] == lab_w[None, :]
    lg = log_gamma.float()[:, None, None]
    qf, kf, vf = (t.float().flatten(1, 2) for t in (q, k, v))  # (B, N, h, .)
    scale = D**-0.5
    if mode == "full":
        o = _masked_softmax_apply(qf, kf, vf, manhattan_log_decay(H, W, log_gamma), same_h & same_w, scale)
    else:
        dx = (col[:, None] - col[None, :]).abs().float()
        dy = (row[:, None] - row[None, :]).abs().float()
        width = (row[:, None] == row[None, :]) & same_w
        height = (col[:, None] == col[None, :]) & same_h
        o = _masked_softmax_apply(qf, kf, vf, lg * dx, width, scale)
        o = _masked_softmax_apply(qf, kf, o, lg * dy, height, scale)
    return o.reshape(B, H, W, h, -1).to(q.dtype)
