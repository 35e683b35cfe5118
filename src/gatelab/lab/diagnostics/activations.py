"""Activation outliers: massive activations (Massive Activations in Large Language Models, Sun et al.,
2024) and the measures of Quantizable Transformers (Bondarenko et al., 2023): per-sequence infinity norm
and kurtosis of each block's output."""

from __future__ import annotations

import torch


def kurtosis(x: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Pearson kurtosis E[(x - mu)^4] / Var(x)^2 (a Gaussian gives 3, not 0), in fp32.

    Args:
        x: any shape.
        dim: the dimension(s) the moments are taken over; None = all elements.
    Returns:
        x's shape without ``dim`` (a 0-d tensor when dim is None). A constant input gives NaN.
    """
    x = x.float()
    dims = tuple(range(x.ndim)) if dim is None else dim
    centred = x - x.mean(dim=dims, keepdim=True)
    var = centred.pow(2).mean(dim=dims)
    return centred.pow(4).mean(dim=dims) / var.pow(2)


def sequence_outlier_stats(block_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizable Transformers' outlier measures of one block's output, one value per sequence.

    Args:
        block_out: (B, T, d_model) what the block adds to the residual stream.
    Returns:
        inf_norm (B,): max |x| over the sequence's T x d_model values;
        kurt (B,): Pearson kurtosis of those T x d_model values.
    """
    if block_out.ndim != 3:
        raise ValueError(f"block_out must have shape (B, T, d_model), got {tuple(block_out.shape)}")
    x = block_out.float()
    return x.abs().amax(dim=(1, 2)), kurtosis(x, dim=(1, 2))


def token_kurtosis(hidden: torch.Tensor) -> torch.Tensor:
    """Kurtosis of the residual stream across its channels, per token: large when a few channels carry
    outlier features (Understanding and Minimising Outlier Features in Transformer Training, He et al.,
    2024).

    Args:
        hidden: (B, T, d_model).
    Returns:
        (B, T) Pearson kurtosis over d_model.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (B, T, d_model), got {tuple(hidden.shape)}")
    return kurtosis(hidden, dim=-1)


def massive_activation_stats(hidden: torch.Tensor) -> dict[str, float]:
    """The largest |activation| of a hidden state and its ratio to the median |activation|.

    Args:
        hidden: (B, T, d_model) (or any shape: all elements are used).
    Returns:
        {"max": max |h|, "median": median |h|, "ratio": max / median (inf when the median is 0)}.
    """
    a = hidden.detach().float().abs().flatten()
    top, median = float(a.max()), float(a.median())
    return {"max": top, "median": median, "ratio": top / median if median > 0 else float("inf")}


def channel_maxima(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where massive activations sit: per channel, the largest |activation| and the token that holds it
    (massive activations live in a few fixed channels, on the first token and on delimiters).

    Args:
        hidden: (B, T, d_model).
    Returns:
        values (d_model,) fp32: max |h| over the B x T tokens, per channel;
        where (d_model,) long: the flat token index b * T + t of that maximum.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (B, T, d_model), got {tuple(hidden.shape)}")
    values, where = hidden.detach().float().abs().flatten(0, 1).max(dim=0)
    return values, where
