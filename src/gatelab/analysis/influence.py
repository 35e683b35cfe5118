"""AttentionInfluence (arXiv 2505.07293): score a sample by how much its loss rises when a set of heads
(the retrieval heads) has its attention made uniform: (L_masked - L_base) / L_base (App. C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hooks import replace_attention

IGNORE = -100


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.logits


def uniform_attention(model, run, heads: dict[int, list[int]]):
    """run()'s output with each listed head's attention set to uniform over its visible (causal) prefix, as
    AttentionInfluence masks its heads: 1/L with L the visible length (the paper leaves L open under a
    causal mask; we take the visible length), so the head's output is the prefix mean of its values."""

    def uniform(T: int) -> torch.Tensor:  # (T, T) rows 1 / (t + 1) on the causal prefix
        return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]

    return replace_attention(model, run, {i: (list(h), uniform) for i, h in heads.items()})


def sample_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy per sample over labelled positions (targets != -100)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    labelled = (targets != IGNORE).sum(1)
    if (labelled == 0).any():
        raise ValueError("every sample needs at least one labelled target (targets != -100)")
    return loss.sum(1) / labelled


def attention_influence(model, idx: torch.Tensor, targets: torch.Tensor, heads: dict[int, list[int]]):
    """(B,) AttentionInfluence = (L_masked - L_base) / L_base per sample, L the mean token cross-entropy
    (arXiv 2505.07293, Sec. 2) and the masked model's ``heads`` uniform (:func:`uniform_attention`).

    idx (B, T) inputs, targets (B, T) next tokens (-100: no label). An empty head set scores 0 exactly."""
    with torch.no_grad():
        base = sample_losses(_logits(model(idx)), targets)
    if not any(heads.values()):
        return torch.zeros_like(base)
    masked = sample_losses(_logits(uniform_attention(model, lambda: model(idx), heads)), targets)
    return (masked - base) / base


__all__ = ["uniform_attention", "sample_losses", "attention_influence"]
