"""What every task shares: batches of (inputs, targets) with -100 on unlabelled positions, fixed
validation batches, and an evaluation that reports loss and accuracy over the labelled positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target value of positions that carry no label (as torch's cross_entropy ignore_index)
VAL_SEED_OFFSET = 1_000_003  # validation streams never share a seed with a training stream


class Task:
    """A source of training and validation batches.

    get_batch(split, batch_size, generator) -> inputs (B, T) long, targets (B, T) long (IGNORE = no label).
    """

    name: str = ""
    vocab_size: int = 0
    seq_len: int = 0
    bos_token: int | None = None  # id of the beginning-of-document token whose attention share is reported

    def __init__(self, **options):
        self.options = options  # what make_task(name, **options) needs to rebuild this task

    def describe(self) -> dict:
        """What results.json records about the task (sizes, hashes, options)."""
        return {"name": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len, **self.options}

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        raise NotImplementedError

    def metric_masks(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named boolean masks (B, T) of labelled positions over which an accuracy is reported."""
        return {"accuracy": targets != IGNORE}

    # Shared -------------------------------------------------------------------------------------------
    @staticmethod
    def check_split(split: str, batch_size: int) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def eval_batches(self, n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of ``n`` validation batches: the same (n, batch_size, seed) gives the same batches."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        generator = torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)
        return [self.get_batch("val", batch_size, generator) for _ in range(n)]

    @torch.no_grad()
    def evaluate(self, model, n_batches: int = 8, batch_size: int = 32, seed: int = 0) -> dict:
        """Mean cross-entropy over labelled positions ("loss") and accuracies from ``metric_masks``."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loss_sum, count = 0.0, 0
        hits: dict[str, float] = {}
        totals: dict[str, int] = {}
        for inputs, targets in self.eval_batches(n_batches, batch_size, seed):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)[0].float()  # (B, T, vocab)
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((targets != IGNORE).sum())
            correct = logits.argmax(dim=-1) == targets  # (B, T)
            for name, mask in self.metric_masks(inputs, targets).items():
                hits[name] = hits.get(name, 0.0) + float((correct & mask).sum())
                totals[name] = totals.get(name, 0) + int(mask.sum())
        model.train(was_training)
        metrics = {"loss": loss_sum / max(count, 1)}
        metrics.update({name: hits[name] / max(totals[name], 1) for name in hits})
        return metrics
