"""Idle-heads recall: a task where almost every position needs no attention at all, the setting in which
heads learn to "do nothing" and grow attention sinks and outliers (Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing, Bondarenko et al., 2023).

One sequence (n_pairs=2, n_queries=2)::

    BOS k1 v1 k2 v2 | c5 c6 c7 k2 v2 c8 c9 c10 c11 k1 v1 c12 ...
    labels           |    c7 c8  v2 .  .  c10 c11 c12 v1 .  .  ...

``c`` is a fixed deterministic chain: every chain token has one successor, the same in every sequence (a
random cycle over the chain tokens fixed by ``seed``), so predicting the next chain token needs only the
current token: the MLP can do it and attention has nothing to add. Rarely (``n_queries`` times, one at
a random place in each of ``n_queries`` equal segments of the chain) a stored key appears; the token after
it must be its value, which only attention to the pairs at the start can supply. Labelled: the query
positions (target = value, "accuracy") and, if ``label_chain``, chain positions followed by a chain token
(target = successor, "chain_accuracy"). Unlabelled (-100): BOS, the pairs, the chain token before a
query key (unpredictable), the value after a query (the chain resumes two tokens back).

Token layout: 0 unused, 1 = BOS, keys [2, 2+n), values [2+n, 2+2n), chain tokens [2+2n, V), n = (V-2)//4.
"""

from __future__ import annotations

import torch

from ._base import IGNORE, Task

BOS = 1


class IdleTask(Task):
    name = "idle"

    def __init__(
        self,
        vocab_size: int = 128,
        seq_len: int = 128,
        n_pairs: int = 4,
        n_queries: int = 4,
        label_chain: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            vocab_size=vocab_size,
            seq_len=seq_len,
            n_pairs=n_pairs,
            n_queries=n_queries,
            label_chain=label_chain,
            seed=seed,
        )
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("n_pairs", n_pairs),
            ("n_queries", n_queries),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"idle: {name} must be a positive int, got {value!r}")
        if vocab_size < 16:
            raise ValueError(
                f"idle: vocab_size must be >= 16 (BOS, keys, values and a chain), got {vocab_size}"
            )
        self.n_keys = (vocab_size - 2) // 4
        if n_pairs > self.n_keys:
            raise ValueError(
                f"idle: n_pairs ({n_pairs}) exceeds the {self.n_keys} distinct keys of vocab_size {vocab_size}"
            )
        self.region = seq_len + 1 - (1 + 2 * n_pairs)  # tokens after the pairs (inputs and last target)
        if self.region // n_queries < 6:
            raise ValueError(
                f"idle: seq_len ({seq_len}) too short for {n_pairs} pairs and {n_queries} queries: each query "
                f"needs a chain segment of at least 6 tokens"
            )
        self.vocab_size, self.seq_len, self.n_pairs, self.n_queries = vocab_size, seq_len, n_pairs, n_queries
        self.label_chain = label_chain
        self.key_lo, self.value_lo, self.chain_lo = 2, 2 + self.n_keys, 2 + 2 * self.n_keys
        n_chain = vocab_size - self.chain_lo
        order = torch.randperm(n_chain, generator=torch.Generator().manual_seed(seed)) + self.chain_lo
        self.chain_order = order  # the cycle, as a sequence of tokens
        self.successor = torch.zeros(vocab_size, dtype=torch.long)
        self.successor[order] = order.roll(-1)

    def is_key(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens >= self.key_lo) & (tokens < self.value_lo)

    def is_chain(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens >= self.chain_lo

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        """-> inputs (B, T) long, targets (B, T) long; a fresh sample for every call (online data)."""
        self.check_split(split, batch_size)
        B, n, Q, R = batch_size, self.n_pairs, self.n_queries, self.region
        keys = torch.rand(B, self.n_keys, generator=generator).argsort(dim=1)[:, :n] + self.key_lo  # (B, n)
        values = torch.randint(self.value_lo, self.chain_lo, (B, n), generator=generator)
        # One query per segment of the chain region, never at a segment's first token or its last two.
        segment = R // Q
        offsets = torch.randint(1, segment - 2, (B, Q), generator=generator)
        query_at = torch.arange(Q) * segment + offsets  # (B, Q) index in the region of each query key
        asked = torch.randint(0, n, (B, Q), generator=generator)  # which pair each query asks for
        is_query_key = torch.zeros(B, R, dtype=torch.bool).scatter_(1, query_at, True)
        is_query_value = torch.zeros(B, R, dtype=torch.bool).scatter_(1, query_at + 1, True)
        in_chain = ~(is_query_key | is_query_value)
        start = torch.randint(0, len(self.chain_order), (B, 1), generator=generator)
        chain_index = (start + in_chain.long().cumsum(dim=1) - 1) % len(self.chain_order)  # (B, R)
        region = self.chain_order[chain_index]
        region.scatter_(1, query_at, keys.gather(1, asked))
        region.scatter_(1, query_at + 1, values.gather(1, asked))
        pairs = torch.stack([keys, values], dim=2).reshape(B, 2 * n)
        tokens = torch.cat([torch.full((B, 1), BOS), pairs, region], dim=1)  # (B, T + 1)
        inputs, nxt = tokens[:, :-1], tokens[:, 1:]
        prefix = torch.zeros(B, 1 + 2 * n, dtype=torch.bool)
        query = torch.cat([prefix, is_query_key], dim=1)[:, :-1]  # input is a query key
        chain = torch.cat([prefix, in_chain], dim=1)  # (B, T + 1)
        chain_to_chain = chain[:, :-1] & chain[:, 1:]
        label = query | (chain_to_chain if self.label_chain else torch.zeros_like(query))
        targets = torch.where(label, nxt, torch.full_like(nxt, IGNORE))
        return inputs, targets

    def metric_masks(self, inputs, targets):
        labelled = targets != IGNORE
        return {
            "accuracy": labelled & self.is_key(inputs),
            "chain_accuracy": labelled & self.is_chain(inputs),
        }
