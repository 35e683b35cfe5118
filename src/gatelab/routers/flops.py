"""Forward FLOP counts per token, the one place that defines them (routers count themselves with these; the
lab's ``diagnostics/compute.py`` counts every other mixer and the LM with them).

A multiply-add is 2 FLOPs. Per token of a sequence of L tokens (a prefill or a training pass), averaged over
its positions; softmax exponentials, norms, activations and gates' elementwise work are not counted:

- projections: 2 FLOPs per weight of every matrix parameter (nn.Linear weights, short-convolution taps);
- attention over n visible keys: 4 * H * D * n (q k^T and p v); causal softmax sees n = i + 1 keys at
  position i, on average (L + 1) / 2;
- sliding_window: min(i + 1, window) recent keys plus the sinks before them;
- hip (approximate): min(i + 1, sinks + window + topk * block_size_k) keys plus one score per key block
  ((i + 1) / block_size_k) for the selection;
- psa (approximate): sum over levels l in (1, 2, 4, 8) of budget_l * (i + 1) / l keys plus one score per key
  block for the selection;
- a linear mixer's recurrent state (H heads of K x V): 5 * H * K * V per token (decay, the k v^T update, the
  q S read-out), 7 * H * K * V for the delta rule of gated_deltanet (its k^T S prediction too).
"""

from __future__ import annotations

import torch.nn as nn

STATE_FLOPS = {"gated_deltanet": 7}  # per H * K * V of the state and token; other linear mixers: 5
DEFAULT_STATE_FLOPS = 5


def linear_flops(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> float:
    """2 FLOPs per weight of every matrix parameter (ndim >= 2) of ``module`` outside ``exclude``: one
    multiply-add per weight and token."""
    skipped = {id(p) for m in exclude for p in m.parameters()}
    return 2.0 * sum(p.numel() for p in module.parameters() if p.ndim >= 2 and id(p) not in skipped)


def _mean_over_positions(seq_len: int, keys_at) -> float:
    return sum(keys_at(i) for i in range(seq_len)) / seq_len


def visible_keys(key: str, config, seq_len: int) -> float | None:
    """Keys (and key-block scores) one query of mechanism ``key`` reads, averaged over the positions of a
    causal pass of ``seq_len`` tokens; None for a mechanism without a count here."""
    if key == "softmax":
        return (seq_len + 1) / 2
    if key == "sliding_window":
        w, s = config.window, config.sinks
        return _mean_over_positions(seq_len, lambda i: min(i + 1, w) + min(s, max(0, i + 1 - w)))
    if key == "hip":
        kept = config.sinks + config.window + config.topk * config.block_size_k
        return _mean_over_positions(seq_len, lambda i: min(i + 1, kept) + (i + 1) / config.block_size_k)
    if key == "psa":
        fraction = sum(b / level for b, level in zip(config.budget, (1, 2, 4, 8)))
        return _mean_over_positions(seq_len, lambda i: min(i + 1, (i + 1) * fraction + config.block_size_k)
                                    + (i + 1) / config.block_size_k)  # fmt: skip
    return None


def attention_flops(key: str, config, seq_len: int) -> float | None:
    """Attention FLOPs per token (q k^T and p v over the visible keys) of an attention layer of mechanism
    ``key`` with ``config`` (n_heads, dim); None for a mechanism without a count here."""
    n = visible_keys(key, config, seq_len)
    return None if n is None else 4.0 * config.n_heads * config.dim * n


def state_flops(key: str, heads: int, key_dim: int, value_dim: int) -> float:
    """FLOPs per token of a linear mixer's recurrent state of ``heads`` x (key_dim x value_dim)."""
    return float(STATE_FLOPS.get(key, DEFAULT_STATE_FLOPS) * heads * key_dim * value_dim)
