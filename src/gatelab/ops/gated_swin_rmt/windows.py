"""Windowed retention in windows: pad, roll, partition, and one SDPA call per pass with the decay and the
region mask as an additive bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import axis_layout, distances


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, *rest) with H, W multiples of the window -> (B, nH, nW, wh * ww, *rest)."""
    B, H, W = x.shape[:3]
    wh, ww = window
    rest = x.shape[3:]
    x = x.reshape(B, H // wh, wh, W // ww, ww, *rest).transpose(2, 3)  # (B, nH, nW, wh, ww, *rest)
    return x.reshape(B, H // wh, W // ww, wh * ww, *rest)


def window_reverse(windows: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, nH, nW, wh * ww, *rest) -> (B, nH * wh, nW * ww, *rest): the inverse of window_partition."""
    B, nH, nW = windows.shape[:3]
    wh, ww = window
    rest = windows.shape[4:]
    x = windows.reshape(B, nH, nW, wh, ww, *rest).transpose(2, 3)  # (B, nH, wh, nW, ww, *rest)
    return x.reshape(B, nH * wh, nW * ww, *rest)


def _padded_labels(L: int, window: int, shift: int, device) -> torch.Tensor:
    """(Lp,) label per coordinate of the padded, rolled axis: window, rolled-round flag and padding, so
    that a query sees only keys of its window, its Swin region and the real map."""
    padded = -(-L // window) * window
    j = torch.arange(padded, device=device)
    original = (j + shift) % padded
    return 4 * (j // window) + (original < shift).long() + 2 * (original >= L).long()


def _axis_bias(labels: torch.Tensor, window: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """(nW, h, w, w) additive bias of one axis: log gamma * |d| inside a region, -inf across."""
    lab = labels.view(-1, window)  # (nW, w)
    allowed = lab[:, :, None] == lab[:, None, :]  # (nW, w, w)
    decay = log_gamma.float()[:, None, None] * distances(window, labels.device).float()  # (h, w, w)
    return torch.where(allowed[:, None], decay[None], float("-inf"))


def _sdpa(q, k, v, bias):
    """q, k (..., h, L, D), v (..., h, L, V), bias broadcastable to (..., h, L, L)."""
    shape = q.shape[:-2]
    flat = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
    bias = bias.to(q.dtype).expand(*shape, q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=flat(bias)).reshape(
        *shape, q.shape[-2], v.shape[-1]
    )


def swin_retention_windows(q, k, v, log_gamma, *, window_size, shift_size, mode="axial"):
    """The function of swin_retention_reference, computed window by window with SDPA."""
    B, H, W, h, D = q.shape
    (wh, sh), (ww, sw) = (
        axis_layout(H, window_size[0], shift_size[0]),
        axis_layout(W, window_size[1], shift_size[1]),
    )
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    dev = q.device
    lab_h, lab_w = _padded_labels(H, wh, sh, dev), _padded_labels(W, ww, sw, dev)

    def prepare(t):  # (B, H, W, h, D) -> padded, rolled (B, Hp, Wp, h, D)
        t = F.pad(t, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        return torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else t

    qp, kp, vp = (prepare(t) for t in (q, k, v))
    nH, nW = Hp // wh, Wp // ww
    if mode == "full":
        lab = (lab_h.view(nH, wh)[:, None, :, None] * 16 + lab_w.view(nW, ww)[None, :, None, :]).reshape(
            nH, nW, -1
        )
        allowed = lab[..., :, None] == lab[..., None, :]  # (nH, nW, n, n)
        dy = distances(wh, dev)[:, None, :, None]
        dx = distances(ww, dev)[None, :, None, :]
        decay = log_gamma.float()[:, None, None] * (dy + dx).reshape(wh * ww, wh * ww).float()  # (h, n, n)
        bias = torch.where(allowed[:, :, None], decay, float("-inf"))  # (nH, nW, h, n, n)
        win = [window_partition(t, (wh, ww)).transpose(-3, -2) for t in (qp, kp, vp)]  # (B, nH, nW, h, n, D)
        o = _sdpa(*win, bias).transpose(-3, -2)
        o = window_reverse(o, (wh, ww))
    else:
        # width: rows of windows, (B, Hp, nW, h, ww, D); the bias depends on the window column only
        rows = lambda t: t.reshape(B, Hp, nW, ww, h, -1).transpose(3, 4)  # noqa: E731
        o = _sdpa(rows(qp), rows(kp), rows(vp), _axis_bias(lab_w, ww, log_gamma))  # (B, Hp, nW, h, ww, V)
        o = o.transpose(3, 4).reshape(B, Hp, Wp, h, -1)
        # height: columns of windows, (B, Wp, nH, h, wh, D)
        cols = lambda t: t.transpose(1, 2).reshape(B, Wp, nH, wh, h, -1).transpose(3, 4)  # noqa: E731
        o = _sdpa(cols(qp), cols(kp), cols(o), _axis_bias(lab_h, wh, log_gamma))  # (B, Wp, nH, h, wh, V)
        o = o.transpose(3, 4).reshape(B, Wp, Hp, h, -1).transpose(1, 2)
    if sh or sw:
        o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
    return o[:, :H, :W]
