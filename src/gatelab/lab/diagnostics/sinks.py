"""Attention sinks and attention entropy, per layer and head (Efficient Streaming Language Models with
Attention Sinks, Xiao et al., 2023; Gated Attention for Large Language Models, Qiu et al., 2025)."""

from __future__ import annotations

import math

import torch


def _check_attn(attn: torch.Tensor) -> None:
    if not isinstance(attn, torch.Tensor) or attn.ndim != 4:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be attention probabilities of shape (B, H, T, S), got {shape}")
    if attn.shape[-1] < attn.shape[-2]:
        raise ValueError(
            f"attn must have at least as many keys S as queries T, got T={attn.shape[-2]}, S={attn.shape[-1]}"
        )


def as_distribution(attn: torch.Tensor) -> torch.Tensor:
    """Rows as distributions over keys: |A| / sum_s |A| (fp32). A no-op for softmax probabilities; for a
    linear mixer's equivalent T x T matrix (unnormalised, possibly negative) it gives each key's share of
    the row's total absolute weight. An all-zero row stays zero."""
    a = attn.float().abs()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def first_token_share(attn: torch.Tensor) -> torch.Tensor:
    """Share of attention that goes to the first key (the attention sink), per head.

    Args:
        attn: (B, H, T, S) attention probabilities (S >= T; keys bottom-right aligned, so with S == T
            query t sees keys 0..t); rows that are not distributions go through :func:`as_distribution`.
    Returns:
        (H,) fp32: attn[b, h, t, 0] averaged over the batch and every query position t (t = 0 included,
        where the share is 1 for any causal mechanism; :func:`uniform_first_token_share` counts it too).
    """
    _check_attn(attn)
    return as_distribution(attn)[..., 0].mean(dim=(0, 2))


def uniform_first_token_share(T: int, S: int | None = None) -> float:
    """The first-token share a head that spreads attention uniformly over the visible keys would have.

    Query t (0-based) sees S - T + t + 1 keys, so uniform attention gives it 1 / (S - T + t + 1);
    this returns the mean over t = 0..T-1 (the baseline :func:`first_token_share` is compared with).
    """
    S = T if S is None else S
    if T < 1 or S < T:
        raise ValueError(f"need 1 <= T <= S, got T={T}, S={S}")
    return sum(1.0 / (S - T + t + 1) for t in range(T)) / T


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each query's attention distribution, per head.

    Args:
        attn: (B, H, T, S) attention probabilities (rows go through :func:`as_distribution`).
    Returns:
        (H,) fp32: -sum_s p log p (with 0 log 0 = 0), averaged over the batch and the query positions.
        A head that looks at one key has entropy 0; see :func:`uniform_entropy` for the other end.
    """
    _check_attn(attn)
    p = as_distribution(attn)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    return (-plogp.sum(dim=-1)).mean(dim=(0, 2))


def uniform_entropy(T: int, S: int | None = None) -> float:
    """Mean entropy of uniform causal attention: the mean over t of log(number of visible keys)."""
    S = T if S is None else S
    if T < 1 or S < T:
        raise ValueError(f"need 1 <= T <= S, got T={T}, S={S}")
    return sum(math.log(S - T + t + 1) for t in range(T)) / T


def key_share(attn: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Share of attention that goes to the marked keys (e.g. the [CLS] and [SEP] tokens), per head.

    Args:
        attn: (B, H, T, S) attention probabilities (rows go through :func:`as_distribution`).
        keys: (B, S) bool, True at the keys whose share is wanted.
    Returns:
        (H,) fp32: sum over the marked keys of attn[b, h, t, s], averaged over the batch and the queries.
    """
    _check_attn(attn)
    B, _, _, S = attn.shape
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.bool or tuple(keys.shape) != (B, S):
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must be a bool mask of shape (B, S) = {(B, S)}, got {shape}")
    p = as_distribution(attn)
    return (p * keys[:, None, None, :].to(p.device)).sum(dim=-1).mean(dim=(0, 2))


def uniform_key_share(keys: torch.Tensor, causal: bool = True) -> float:
    """The share of the marked keys that attention spread uniformly over the visible keys would give.

    Args:
        keys: (B, T) bool, True at the marked keys (queries and keys are the same T positions).
        causal: query t sees keys 0..t (else all T).
    Returns:
        the mean over the batch and the queries of (marked keys visible to t) / (keys visible to t): the
        baseline of :func:`key_share` (of :func:`uniform_first_token_share` when only key 0 is marked).
    """
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.bool or keys.ndim != 2:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must be a bool mask of shape (B, T), got {shape}")
    marked = keys.float()
    if not causal:
        return float(marked.mean())
    visible = torch.arange(1, keys.shape[1] + 1, device=keys.device)  # (T,)
    return float((marked.cumsum(dim=1) / visible).mean())
