"""Linear attention with a fixed per-head decay, the definition: the recurrence token by token in fp32
(TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer (Qin et al., 2023);
Lightning Attention-2 (Qin et al., 2024))."""

from __future__ import annotations

import math

import torch

from gatelab.ops.common.recurrent import token_loop_backend


def expand_decay(decay: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-head log decay (H,) or (B, T, H) -> (B, T, H) fp32 (a view for (H,), so gradients sum over B, T)."""
    B, T, H = q.shape[:3]
    decay = decay.float()
    return decay.expand(B, T, H) if decay.ndim == 1 else decay


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes (Train Short, Test Long (Press et al., 2021)), as TransNormerLLM sets its
    decays: head h = 1..H gets 2^(-8h/H); for H not a power of two, the odd-numbered slopes of the next
    power of two fill in. Returns (H,) fp32; the decay of head h is exp(-slope_h)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        base = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(base) + alibi_slopes(2 * base).tolist()[0::2][: n_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def lightning_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of S_t = exp(decay_t) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t: state (B, H, K, V)
    fp32; q, k (B, H, K); v (B, H, V); decay (B, H) log decay. Returns o (B, H, V) fp32 and the new state."""
    state = decay.float().exp()[..., None, None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
    return o, state


def per_token_decay(q: torch.Tensor, decay: torch.Tensor) -> tuple[torch.Tensor]:
    """The gates the token loop indexes along T: the decay as (B, T, H) (see :func:`expand_decay`)."""
    return (expand_decay(decay, q),)


# (q, k, v, decay, *, scale, initial_state, output_final_state), decay (H,) or (B, T, H): the recurrence
# over T in fp32, one scalar decay per head; shapes as lightning
lightning_reference = token_loop_backend(lightning_step, "lightning_reference", per_token_decay)


def lightning_attention_matrix(
    q: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The T x T matrix A with o = A v (initial state zero): A[i, j] = scale * q_i . k_j *
    exp(decay_{j+1} + ... + decay_i) for j <= i, else 0. q, k (B, T, H, K) -> (B, H, T, T) fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b = expand_decay(decay, q).cumsum(1).transpose(1, 2)  # (B, H, T)
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))  # masked before exp
    scores = torch.einsum("bihk,bjhk->bhij", q.float() * scale, k.float())
    return scores * diff.exp()
