"""Multi-query associative recall, generated as Zoology does (Zoology: Measuring and Improving Recall in
Efficient Language Models, Arora et al., 2023).

One sequence of length T (example V=12, kv=2, T=16)::

    inputs   k1 v1 k2 v2 | 0  0  k2 0  0  0  0  0  k1 0  0  0
    targets  .  .  .  .  | .  .  v2 .  .  .  .  .  v1 .  .  .      (. = -100, no label)

keys are drawn without replacement from [1, V/2), values from [V/2, V); the kv pairs come first; each key
is queried once, at an even offset 2*gap after them, the gaps drawn without replacement from a power law
p(gap = i - 1) ~ a * i^(a - 1), i = 1..(T - 2kv)/2 (a = 0.01: short gaps are likelier); the label sits at
the query position and is the key's value; fillers are 0. Zoology's code by default replaces the
fillers with random tokens (``random_non_queries``); ``random_fillers=True`` does the same here.
"""

from __future__ import annotations

import torch

from ._base import IGNORE, Task


def power_law(space: int, power_a: float) -> torch.Tensor:
    """(space,) probabilities of the gaps 0..space-1: p_i ~ a * i^(a - 1), i = 1..space, normalised."""
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


class MQARTask(Task):
    name = "mqar"

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 64,
        num_kv_pairs: int = 4,
        power_a: float = 0.01,
        random_fillers: bool = False,
    ):
        super().__init__(
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_kv_pairs=num_kv_pairs,
            power_a=power_a,
            random_fillers=random_fillers,
        )
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mqar: {name} must be a positive int, got {value!r}")
        if seq_len % 2:
            raise ValueError(f"mqar: seq_len must be even, got {seq_len}")
        if vocab_size <= seq_len:
            raise ValueError(f"mqar: vocab_size ({vocab_size}) must be larger than seq_len ({seq_len})")
        if 4 * num_kv_pairs > seq_len:
            raise ValueError(
                f"mqar: num_kv_pairs ({num_kv_pairs}) too large: the pairs and their queries need "
                f"4 * num_kv_pairs <= seq_len ({seq_len})"
            )
        if num_kv_pairs > vocab_size // 2 - 1:
            raise ValueError(
                f"mqar: num_kv_pairs ({num_kv_pairs}) exceeds the {vocab_size // 2 - 1} distinct keys"
            )
        if not 0 < power_a <= 1:
            raise ValueError(f"mqar: power_a must be in (0, 1], got {power_a}")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.random_fillers = random_fillers
        self.gap_probs = power_law((seq_len - 2 * num_kv_pairs) // 2, power_a).float()

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        """-> inputs (B, T) long, targets (B, T) long; a fresh sample for every call (online data)."""
        self.check_split(split, batch_size)
        B, T, kv, V = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
        half = V // 2
        # Distinct keys / values per row: the first kv of a random permutation of each range.
        keys = torch.rand(B, half - 1, generator=generator).argsort(dim=1)[:, :kv] + 1  # (B, kv) in [1, V/2)
        values = torch.rand(B, V - half, generator=generator).argsort(dim=1)[:, :kv] + half  # in [V/2, V)
        gaps = torch.multinomial(self.gap_probs.expand(B, -1), kv, replacement=False, generator=generator)
        inputs = torch.zeros(B, T, dtype=torch.long)
        inputs[:, 0 : 2 * kv : 2] = keys
        inputs[:, 1 : 2 * kv : 2] = values
        query_pos = 2 * kv + 2 * gaps  # (B, kv)
        inputs.scatter_(1, query_pos, keys)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        targets.scatter_(1, query_pos, values)
        if self.random_fillers:
            noise = torch.randint(V, (B, T), generator=generator)
            inputs = torch.where(inputs == 0, noise, inputs)
        return inputs, targets
