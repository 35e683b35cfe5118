"""Sliding-window attention with attention sinks for language models (Efficient Streaming Language Models
with Attention Sinks, Xiao et al., 2024): softmax attention over the last ``window`` tokens plus the first
``sinks``, whose decoding cache keeps only those keys, so memory stays constant however long it decodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gatelab.ops.sliding_window import BACKENDS, sliding_window
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer
from ._base import check_positive
from ._kv_cache import KVCache, KVCacheManager


@dataclass
class SlidingWindowConfig(AttentionConfig):
    window: int = 256  # a token sees itself and the window - 1 tokens before it
    sinks: int = 4  # the first tokens, always visible (StreamingLLM keeps 4)

    def __post_init__(self):
        super().__post_init__()
        check_positive("window", self.window)
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")
        if not self.causal:
            raise ValueError("sliding_window is a causal (decoder) mixer; causal=False is not supported")


class SinksAndWindowCache(KVCacheManager):
    """Keep the sinks and the last window - 1 keys: all that any later token can see. The kept keys are no
    longer contiguous, but the mask only compares positions inside the recent run (whose differences are
    unchanged) and indices below ``sinks`` (still the sinks), so the attention is unchanged."""

    def __init__(self, config: SlidingWindowConfig):
        self.config = config

    def evict(self, cache: KVCache, probs) -> KVCache:
        c = self.config
        recent = c.window - 1
        S = cache.k.shape[1]
        if S <= c.sinks + recent:
            return cache
        keep_k = [cache.k[:, : c.sinks]] + ([cache.k[:, S - recent :]] if recent else [])
        keep_v = [cache.v[:, : c.sinks]] + ([cache.v[:, S - recent :]] if recent else [])
        return KVCache(torch.cat(keep_k, dim=1), torch.cat(keep_v, dim=1), cache.length,
                       signature=cache.signature)  # fmt: skip


class SlidingWindowAttention(AttentionMixer):
    config_cls = SlidingWindowConfig
    accepts_cache_policy = (
        False  # ``attend`` reads the kept keys as sinks + a recent run: a policy's would not be
    )

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        o = sliding_window(q, k, v, window=c.window, sinks=c.sinks, backend=c.backend)
        internals = self.probs(q, k, window=c.window, sinks=c.sinks) if want_internals else {}
        return o, internals

    def own_cache(self) -> KVCacheManager:
        return SinksAndWindowCache(self.config)

    def cache_bytes(self, batch: int, dtype_bytes: int = 4) -> int:
        """Bytes the decoding cache holds at most: (sinks + window - 1) keys and values per sequence."""
        c = self.config
        return 2 * batch * (c.sinks + c.window - 1) * c.kv_heads * c.dim * dtype_bytes


register(
    MechanismSpec(
        key="sliding_window",
        family="sparse",
        config_cls=SlidingWindowConfig,
        module_cls=SlidingWindowAttention,
        op=sliding_window,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2024)",
        notes="the decoding cache keeps sinks + window - 1 keys",
        extra={"test_options": {"window": 4, "sinks": 2}},
    )
)
