"""Sequence mixers: one file per mechanism, each registering itself under its key."""

from ._attention import AttentionConfig, AttentionMixer
from ._base import Mixer, MixerConfig, StateSignature
from ._kv_cache import KVCache, KVCacheManager
from ._linear import RecurrentState

__all__ = [
    "Mixer",
    "MixerConfig",
    "AttentionMixer",
    "AttentionConfig",
    "KVCache",
    "KVCacheManager",
    "RecurrentState",
    "StateSignature",
]
