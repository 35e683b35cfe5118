"""The KV cache of the attention mixers and the one place that decides what it holds.

An attention mixer's forward asks its :class:`KVCacheManager` to ``update`` the cache with the new keys and
values (which gives back what the queries attend to), runs the mechanism's ``attend``, then asks it to
``evict`` (as transformers' Cache classes: update, then evict). The plain manager keeps every token; a
mechanism with its own cache (sliding_window) supplies its own manager; a KV-cache policy of
``gatelab.cache`` is another manager plugged into the mixer's ``cache_policy`` slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._base import StateSignature


@dataclass
class KVCache:
    """Keys and values seen so far. k (B, S, Hkv, D) after RoPE, v (B, S, Hkv, V);
    ``length`` counts the tokens seen, which give the next token's position; ``signature`` says which
    mechanism, batch and heads it was made for (None: a cache outside a mixer, e.g. an attention gate's)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int
    signature: StateSignature | None = field(default=None, kw_only=True)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        return KVCache(torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1), self.length + k.shape[1],
                       signature=self.signature)  # fmt: skip

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCacheManager:
    """The plain KV cache: every token is kept. Subclasses change what is stored (``update``), what the
    queries see, and what is dropped after the attention (``evict``).

    Class options: ``state_cls`` the state it returns and accepts; ``needs_probs``: ``evict`` reads the
    new queries' attention probabilities; ``rope_by_cache_position``: keys enter the cache before RoPE
    (``update`` rotates queries and keys by their slot in the cache).
    """

    name = "none"
    state_cls: type = KVCache
    needs_probs = False
    rope_by_cache_position = False

    def check_state(self, mixer, state, batch: int) -> None:
        """TypeError unless ``state`` is None or this manager's state; ValueError unless it was made for
        ``mixer``'s mechanism, this batch and these heads."""
        if state is not None:
            mixer.check_state(state, self.state_cls, batch, self._under())

    def _under(self) -> str:
        return "" if self.name == "none" else f" under policy {self.name!r}"

    def cuts(self, start: int, T: int, return_internals: bool) -> list[int]:
        """Where to cut a call of T tokens (the first at position ``start``): [0, ..., T]; the pieces run one
        after another on the cache. Default: one piece."""
        return [0, T]

    def end_piece(self, tokens: int) -> None:
        """Called after each piece of a call that ``cuts`` cut in several."""

    def end_call(self, tokens: int) -> None:
        """Called after the last piece of a call that ``cuts`` cut in several."""

    def update(self, mixer, state, q, k, v, x, positions):
        """The cache with the new tokens, and what the new queries attend to.

        q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, V) of the new tokens (after RoPE unless
        ``rope_by_cache_position``), x (B, T, d_model) the mixer input, positions (T,) long ->
        (cache, q', keys (B, S, Hkv, D'), values (B, S, Hkv, V)).
        """
        if state is None:
            cache = KVCache(k, v, k.shape[1], signature=mixer.state_signature(k.shape[0]))
        else:
            cache = state.append(k, v)
        return cache, q, cache.k, cache.v

    def evict(self, cache, probs: torch.Tensor | None):
        """The cache after the attention (probs (B, H, T, S) of the new queries, or None). Default: all kept."""
        return cache

    def internals(self, cache) -> dict:
        """Diagnostics of the cache after a call, added to the mixer's internals. Default: none."""
        return {}


PLAIN_CACHE = KVCacheManager()

__all__ = ["KVCache", "KVCacheManager", "PLAIN_CACHE"]
