"""Metrics over attention maps: mean backward distance per head, WAAD and FAI (Attention Illuminates LLM
Reasoning, arXiv 2510.13554, Defs. 4.1 and 4.2), and the contrast of a task-query map with a general-query
map (Focusing by Contrastive Attention, CARVE, arXiv 2509.06461). Maps are (..., T, S) with rows summing to
1 and queries bottom-right aligned (query i at position i + S - T), as the mixers' "attn" internals."""

from __future__ import annotations

import torch


def _distances(T: int, S: int, device) -> torch.Tensor:
    """(T, S) t - s for query position t = i + S - T, clamped at 0 (a causal map has no mass beyond)."""
    t = torch.arange(T, device=device)[:, None] + (S - T)
    s = torch.arange(S, device=device)[None, :]
    return (t - s).clamp(min=0).float()


def _check_map(attn: torch.Tensor, name: str = "attn") -> None:
    if not isinstance(attn, torch.Tensor) or attn.ndim < 2 or attn.shape[-1] < attn.shape[-2]:
        got = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"{name} must be a (..., T, S) attention map with S >= T, got {got}")


def mean_backward_distance(attn: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """d = (1/|R|) sum_{t in R} sum_{s<=t} A[t, s] (t - s) (arXiv 2510.13554, Sec. 4): attn (B, H, T, S)
    -> (H,), averaged over the batch and the query positions R (``positions``: bool (T,), None: all)."""
    _check_map(attn)
    T, S = attn.shape[-2:]
    per_query = (attn.float() * _distances(T, S, attn.device)).sum(-1)  # (B, H, T)
    if positions is not None:
        per_query = per_query[..., positions]
    return per_query.mean(dim=(0, -1))


def head_groups(distances: torch.Tensor, share: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(local, global) head indices: the bottom and top ``share`` of heads by mean backward distance
    (the paper: 30% each); ``distances`` is flat over all (layer, head) pairs of interest."""
    if not 0 < share <= 0.5:
        raise ValueError(f"share must be in (0, 0.5], got {share}")
    k = max(1, round(share * distances.numel()))
    order = distances.flatten().argsort()
    return order[:k], order[-k:]


def waad(attn: torch.Tensor, window: int = 10) -> torch.Tensor:
    """Windowed average attention distance, Def. 4.1: WAAD_t = sum_{s<=t} A[t, s] min(t - s, W) (no
    further normalisation: rows sum to 1, so it is the expected clipped distance in [0, W]).

    attn (..., T, S), the mean map of the local heads -> (..., T). W = 10 as the paper."""
    _check_map(attn)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    T, S = attn.shape[-2:]
    return (attn.float() * _distances(T, S, attn.device).clamp(max=window)).sum(-1)


def fai(attn: torch.Tensor, low: int = 10, high: int = 100, positions: torch.Tensor | None = None):
    """Future attention influence, Def. 4.2: FAI_s = (1/|T(s)|) sum_{t in T(s)} A[t, s] with T(s) = {t in R:
    s + low <= t <= s + high} (the paper's H_lo = 10, H_hi = 100).

    attn (..., T, T) the mean map of the global heads (square: keys are the query positions) -> (..., T);
    R = ``positions`` (bool (T,), None: all). A key with an empty T(s) (near the end) gets NaN: undefined,
    not zero (our choice)."""
    _check_map(attn)
    T, S = attn.shape[-2:]
    if T != S:
        raise ValueError(f"fai needs a square map (keys = the query positions), got T={T}, S={S}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    t_minus_s = torch.arange(T, device=attn.device)[None, :] - torch.arange(T, device=attn.device)[:, None]
    window = (t_minus_s >= low) & (t_minus_s <= high)  # (S, T)
    if positions is not None:
        window = window & positions.to(attn.device)[None, :]
    column = attn.float().transpose(-1, -2)  # (..., S, T): A[t, s] at [s, t]
    count = window.sum(-1).float()  # (S,)
    total = (column * window).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def contrast(task: torch.Tensor, general: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CARVE-style contrast of a task-query attention map with a general-query map, per key token:
    S = A_task / (A_general + eps). The paper's operator is not verified (its formula was not recoverable);
    we use the relative-attention ratio, which is invariant to a per-token noise factor that both maps share
    and monotone in A_task when A_general is uniform. task / general: the same shape (..., S)."""
    if task.shape != general.shape:
        raise ValueError(
            f"task and general maps must have one shape, got {tuple(task.shape)} and {tuple(general.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return task.float() / (general.float() + eps)


def contrast_mask(scores: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    """bool mask of the ``keep`` share of tokens with the highest contrast along the last axis (CARVE masks
    the low-contrast tokens out, training-free)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    k = max(1, round(keep * scores.shape[-1]))
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, index, True)


__all__ = ["mean_backward_distance", "head_groups", "waad", "fai", "contrast", "contrast_mask"]
