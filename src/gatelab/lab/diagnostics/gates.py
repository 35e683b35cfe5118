"""Gate statistics: how open a layer's gates are (Gated Attention for Large Language Models, Qiu et al.,
2025, report a mean score near 0.1 for the sparse, query-dependent sigmoid gate)."""

from __future__ import annotations

import torch


def gate_statistics(gate: torch.Tensor, threshold: float = 0.1) -> dict[str, float]:
    """Mean gate value and the fraction of gate values below ``threshold``.

    Args:
        gate: gate values of any shape, e.g. (B, T, H, D) elementwise or (B, T, H, 1) headwise.
        threshold: the "closed" level (0.1 as in the paper).
    Returns:
        {"mean": mean value, "frac_below": fraction of values < threshold, "count": number of values}.
    """
    if not isinstance(gate, torch.Tensor) or gate.numel() == 0:
        raise ValueError(f"gate must be a non-empty tensor, got {gate!r}")
    g = gate.detach().float()
    return {"mean": float(g.mean()), "frac_below": float((g < threshold).float().mean()), "count": g.numel()}
