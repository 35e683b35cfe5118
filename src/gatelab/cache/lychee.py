"""LycheeDecode as a KV-cache policy for any softmax-family mixer: at each decoding step the retrieval KV
heads attend to the whole cache and their attention picks the top-``budget`` tokens, which are all the other
(sparse) KV heads see (LycheeDecode, arXiv 2602.04541; the learnt form is the ``lychee`` mixer,
gatelab.routers.lychee).

As in the paper, the prefill (a call of more than one token) is dense and only decoding steps are sparse, so
prefill + decode differs from one parallel pass by design. The cache keeps every token: the method saves
reads of the cache (a sparse head loads ``budget`` rows), not its size. The retrieval heads are given
(``retrieval_heads``: KV head indices, or a count of leading heads), e.g. the partition a trained ``lychee``
layer learnt. ``correction_every`` is the paper's Cache Correction: a dense step at every position that is a
multiple of it. The tokens are chosen from the probabilities of plain scaled dot products q.k, the scores
every softmax-family mechanism starts from.
"""

from __future__ import annotations

import torch

from gatelab.ops.softmax import attention_probs

from .policies import MASKED, CachePolicy, resolve_budget, with_key_bias


class LycheePolicy(CachePolicy):
    """Decoding steps: sparse KV heads see only the ``budget`` tokens the retrieval KV heads attend to most
    (their probabilities averaged over the retrieval query heads); ``last_selected`` (B, S) bool holds the
    last step's choice (None after a dense call)."""

    name = "lychee"

    def __init__(self, kv_heads: int, budget, retrieval_heads=1, seq_len: int | None = None,
                 correction_every: int | None = None):  # fmt: skip
        super().__init__()
        self.budget = resolve_budget("budget", budget, seq_len)
        if isinstance(retrieval_heads, int) and not isinstance(retrieval_heads, bool):
            if not 1 <= retrieval_heads <= kv_heads:
                raise ValueError(
                    f"retrieval_heads as a count must be in [1, {kv_heads}], got {retrieval_heads}"
                )
            retrieval_heads = tuple(range(retrieval_heads))
        if not isinstance(retrieval_heads, tuple | list) or not retrieval_heads:
            raise TypeError(f"retrieval_heads must be a count or KV head indices, got {retrieval_heads!r}")
        heads = tuple(retrieval_heads)
        if any(not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < kv_heads for h in heads):
            raise ValueError(f"retrieval_heads must be KV head indices in [0, {kv_heads}), got {heads}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"retrieval_heads must not repeat a head, got {heads}")
        if correction_every is not None and (
            not isinstance(correction_every, int)
            or isinstance(correction_every, bool)
            or correction_every < 1
        ):
            raise ValueError(f"correction_every must be a positive int or None, got {correction_every!r}")
        self.kv_heads, self.retrieval_heads, self.correction_every = kv_heads, heads, correction_every
        self.last_selected: torch.Tensor | None = None

    def update(self, mixer, state, q, k, v, x, positions):
        cache, q, keys, values = super().update(mixer, state, q, k, v, x, positions)
        self.last_selected = None
        T, S = q.shape[1], keys.shape[1]
        dense = T > 1 or S <= self.budget
        if self.correction_every is not None:
            dense = dense or int(positions[0]) % self.correction_every == 0
        if dense or len(self.retrieval_heads) == self.kv_heads:
            return cache, q, keys, values
        B, H, Hkv = q.shape[0], q.shape[2], keys.shape[2]
        group = H // Hkv
        index = torch.tensor(self.retrieval_heads, device=q.device)
        q_heads = (index[:, None] * group + torch.arange(group, device=q.device)).flatten()
        p = attention_probs(q[:, :, q_heads], keys[:, :, index], causal=True)  # (B, n group, 1, S)
        top = p.mean(1)[:, 0].topk(self.budget, dim=-1).indices  # (B, budget)
        selected = torch.zeros(B, S, dtype=torch.bool, device=q.device).scatter(-1, top, True)
        sparse = torch.ones(Hkv, dtype=torch.bool, device=q.device)
        sparse[index] = False
        hidden = ~selected[:, :, None] & sparse  # (B, S, Hkv)
        bias = torch.zeros(B, S, Hkv, device=q.device).masked_fill(hidden, MASKED)
        self.last_selected = selected
        q, keys = with_key_bias(q, keys, bias)
        return cache, q, keys, values

    def extra_repr(self) -> str:
        return (f"budget={self.budget}, retrieval_heads={self.retrieval_heads}, "
                f"correction_every={self.correction_every}")  # fmt: skip


__all__ = ["LycheePolicy"]
