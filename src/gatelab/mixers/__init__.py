"""Sequence mixers: one file per mechanism, each registering itself under its key."""

from ._attention import AttentionConfig, AttentionMixer, KVCache
from ._base import Mixer, MixerConfig
from ._linear import RecurrentState

__all__ = ["Mixer", "MixerConfig", "AttentionMixer", "AttentionConfig", "KVCache", "RecurrentState"]
