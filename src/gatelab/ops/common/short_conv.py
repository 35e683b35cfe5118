"""Short causal depthwise convolution over time with a decoding state, as the token-mixing front end of
linear-attention layers (Mamba, DeltaNet, Gated DeltaNet: Improving Mamba2 with Delta Rule, Yang et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_choice, check_tensor


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    state: torch.Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = act(bias + sum_{i < W} weight[:, i] * x_{t - W + 1 + i}), channel by channel.

    Args:
        x: (B, T, C) inputs.
        weight: (C, W) per-channel taps, the last tap multiplies the current token.
        bias: (C,) or None.
        state: (B, W - 1, C) the inputs before x (a previous call's final state); zeros if None.
        activation: "silu" or None.
        output_final_state: also return the last W - 1 inputs, to continue with the next call.
    Returns:
        y (B, T, C) in x's dtype, and the state (B, W - 1, C) in x's dtype or None.
    """
    check_tensor("x", x, 3, "(B, T, C)")
    check_tensor("weight", weight, 2, "(C, W)")
    check_choice("activation", activation, ("silu", None))
    B, T, C = x.shape
    W = weight.shape[1]
    if weight.shape[0] != C:
        raise ValueError(
            f"weight must have shape (C, W) with C = {C} channels of x, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(bias.shape)}")
    if state is None:
        state = x.new_zeros(B, W - 1, C)
    elif tuple(state.shape) != (B, W - 1, C):
        raise ValueError(f"state must have shape (B, W - 1, C) = {(B, W - 1, C)}, got {tuple(state.shape)}")
    full = torch.cat([state.to(x.dtype), x], dim=1)  # (B, W - 1 + T, C)
    y = F.conv1d(  # (B, C, T)
        full.transpose(1, 2),
        weight.to(x.dtype)[:, None, :],
        None if bias is None else bias.to(x.dtype),
        groups=C,
    )
    y = y.transpose(1, 2)  # (B, T, C)
    if activation == "silu":
        y = F.silu(y)
    return y, (full[:, T:] if output_final_state else None)  # last W - 1 inputs
