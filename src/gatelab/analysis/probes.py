"""Linear probes on the residual stream per position (Refusal Falls off a Cliff, arXiv 2510.06036: a
logistic probe p = sigmoid(w^T h + b) trained on the final prompt position's hidden state, then read at
every position; the cliff is the drop of p over the last positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Probe:
    weight: torch.Tensor  # (d,)
    bias: torch.Tensor  # ()

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> probability (...) of the positive class."""
        return torch.sigmoid(hidden.float() @ self.weight + self.bias)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, steps: int = 100) -> Probe:
    """Logistic regression by L-BFGS on features (N, d), labels (N,) in {0, 1}; loss = mean BCE + l2 |w|^2.
    Features are used as given (no standardisation), so the probe reads the stream directly."""
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, d) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    x, y = features.detach().float(), labels.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Probe(w.detach(), b.detach())


def probe_accuracy(probe: Probe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((probe.scores(features) > 0.5).float() == labels.float()).float().mean())


def probe_by_position(hidden: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, **options):
    """One probe per position: hidden (B, T, d), labels (B,), train bool (B,) -> (T,) held-out accuracy
    of a probe fitted at each position on the ``train`` rows and scored on the others."""
    test = ~train
    if not train.any() or not test.any():
        raise ValueError("train must mark some rows, and leave some rows for the held-out score")
    return torch.tensor(
        [
            probe_accuracy(
                fit_probe(hidden[train, t], labels[train], **options), hidden[test, t], labels[test]
            )
            for t in range(hidden.shape[1])
        ]
    )


def cliff(scores: torch.Tensor, last: int) -> torch.Tensor:
    """The largest drop of a probe's score over the last ``last`` positions: max_{i <= j} p_i - p_j over
    positions T - last .. T - 1 (0 if it never falls); scores (..., T) -> (...). The paper measures the
    drop before the output starts; where it begins is the caller's choice of ``last``."""
    if not 1 <= last <= scores.shape[-1]:
        raise ValueError(f"last must be in [1, T={scores.shape[-1]}], got {last}")
    tail = scores[..., -last:]
    running_max = tail.cummax(-1).values
    return (running_max - tail).amax(-1)


__all__ = ["Probe", "fit_probe", "probe_accuracy", "probe_by_position", "cliff"]
