"""Boolean attention masks (True = may attend), shared by the dense references and the SDPA paths.

Causal masks are bottom-right aligned, as in flash-attn: with Tq queries and S keys, query i sits at
absolute position i + S - Tq, so a decode step (Tq=1) sees every cached key.
"""

from __future__ import annotations

import torch


def attention_mask(
    Tq: int, S: int, *, causal: bool, window: int | None = None, sinks: int = 0, device=None
) -> torch.Tensor | None:
    """(Tq, S) bool mask, or None when everything is visible.

    window: a query at position p sees keys in (p - window, p] (causal) or [p - window + 1, p + window - 1].
    sinks: the first ``sinks`` keys are always visible (StreamingLLM's attention sinks).
    """
    if not causal and window is None:
        return None
    q_pos = torch.arange(Tq, device=device)[:, None] + (S - Tq)  # (Tq, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = torch.ones(Tq, S, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
        if not causal:
            mask &= (k_pos - q_pos) < window
    if sinks > 0:
        sink = k_pos < sinks
        mask |= sink & (k_pos <= q_pos) if causal else sink
    return mask
