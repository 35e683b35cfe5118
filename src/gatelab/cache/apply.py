"""Plugging KV-cache policies into attention mixers: build one by name, check that a mixer takes one, give
every layer of a model its own, take them out again."""

from __future__ import annotations

import torch.nn as nn

from gatelab.mixers._attention import AttentionMixer

from .attention_gate import AttentionGatePolicy
from .lychee import LycheePolicy
from .policies import CachePolicy, H2OPolicy, StreamingPolicy

POLICIES = ("full", "streaming", "h2o", "attention_gate", "lychee")


def make_policy(name: str, mixer: nn.Module, **options) -> CachePolicy:
    """One policy for ``mixer``: "full", "streaming" (budget, sinks, window, seq_len,
    rope_by_cache_position), "h2o" (budget, recent, seq_len) or "attention_gate" (target_keep,
    eviction_weight, heads, d_gate, window, init_keep, relaxation) or "lychee" (budget, retrieval_heads,
    seq_len, correction_every)."""
    check_cacheable(mixer)
    if name == "full":
        if options:
            raise TypeError(f"policy 'full' takes no options, got {sorted(options)}")
        policy = CachePolicy()
    elif name == "streaming":
        policy = StreamingPolicy(**options)
    elif name == "h2o":
        policy = H2OPolicy(**options)
    elif name == "attention_gate":
        c = mixer.config
        policy = AttentionGatePolicy(c.d_model, c.kv_heads, **options)
    elif name == "lychee":
        policy = LycheePolicy(mixer.config.kv_heads, **options)
    else:
        raise ValueError(f"unknown cache policy {name!r}; known policies: {', '.join(POLICIES)}")
    return policy.train(mixer.training)  # a gate follows its mixer: relaxed in training, hard in eval


def check_cacheable(mixer: nn.Module) -> None:
    """A policy needs a causal softmax-family mixer whose attention takes a policy's cache (a mechanism
    that relies on its own cache says so with ``accepts_cache_policy = False``)."""
    if not isinstance(mixer, AttentionMixer):
        raise TypeError(
            f"a cache policy needs a softmax-family mixer with a KV cache, got {type(mixer).__name__} "
            "(recurrent mixers keep a fixed-size state, not a KV cache)"
        )
    mixer.check_accepts_policy()
    if not mixer.config.causal:
        raise ValueError(f"a cache policy needs a causal mixer; {type(mixer).__name__} has causal=False")


def cacheable(mixer: nn.Module) -> bool:
    try:
        check_cacheable(mixer)
    except (TypeError, ValueError):
        return False
    return True


def attention_mixers(model: nn.Module) -> list[nn.Module]:
    """The mixers of an LM (``model.blocks[i].mixer``), or [model] for a single mixer."""
    if hasattr(model, "blocks"):
        return [block.mixer for block in model.blocks]
    return [model]


def apply_policy(
    model: nn.Module, name: str, *, skip_uncacheable: bool = False, **options
) -> list[CachePolicy]:
    """Give every mixer of ``model`` (an LM or one mixer) its own policy; all must take one, unless
    ``skip_uncacheable`` (hybrids: recurrent layers keep their state and get none). Returns the policies in
    layer order. The attention gates become submodules, so they train and save with the model."""
    mixers = attention_mixers(model)
    if skip_uncacheable:
        mixers = [mixer for mixer in mixers if cacheable(mixer)]
    for mixer in mixers:
        check_cacheable(mixer)
    policies = [make_policy(name, mixer, **options) for mixer in mixers]
    device = next(model.parameters()).device
    for mixer, policy in zip(mixers, policies):
        mixer.set_cache_policy(policy.to(device))
    return policies


def remove_policy(model: nn.Module) -> None:
    """Back to each mixer's own cache."""
    for mixer in attention_mixers(model):
        if isinstance(mixer, AttentionMixer):
            mixer.set_cache_policy(None)
