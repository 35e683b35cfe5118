"""KV-cache policies for decoding with softmax-family mixers: full, streaming, h2o, attention_gate
("In-context KV-Cache Eviction for LLMs via Attention-Gate", Zeng et al., 2024, and its baselines).

    policies = apply_policy(model, "h2o", budget=0.5, seq_len=512)   # every attention layer of an LM
    logits, states = model(idx)                                       # states are PolicyCache objects
    cache_bytes(states)                                               # bytes held per layer
    remove_policy(model)
"""

from __future__ import annotations

import torch.nn as nn

from gatelab.mixers._attention import AttentionMixer

from .attention_gate import AttentionGate, AttentionGatePolicy
from .policies import MASKED, CachePolicy, H2OPolicy, PolicyCache, StreamingPolicy, resolve_budget

POLICIES = ("full", "streaming", "h2o", "attention_gate")


def make_policy(name: str, mixer: nn.Module, **options) -> CachePolicy:
    """One policy for ``mixer``: "full", "streaming" (budget, sinks, window, seq_len,
    rope_by_cache_position), "h2o" (budget, recent, seq_len) or "attention_gate" (target_keep,
    eviction_weight, heads, d_gate, window, init_keep, relaxation)."""
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
    else:
        raise ValueError(f"unknown cache policy {name!r}; known policies: {', '.join(POLICIES)}")
    return policy.train(mixer.training)  # a gate follows its mixer: relaxed in training, hard in eval


def check_cacheable(mixer: nn.Module) -> None:
    """A policy needs a causal softmax-family mixer that keeps a plain KV cache."""
    if not isinstance(mixer, AttentionMixer):
        raise TypeError(
            f"a cache policy needs a softmax-family mixer with a KV cache, got {type(mixer).__name__} "
            "(recurrent mixers keep a fixed-size state, not a KV cache)"
        )
    if type(mixer)._forward is not AttentionMixer._forward:
        raise TypeError(
            f"{type(mixer).__name__} manages its own KV cache (it overrides _forward); a cache policy "
            "cannot be applied to it"
        )
    if not mixer.config.causal:
        raise ValueError(f"a cache policy needs a causal mixer; {type(mixer).__name__} has causal=False")


def _cacheable(mixer: nn.Module) -> bool:
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
        mixers = [mixer for mixer in mixers if _cacheable(mixer)]
    for mixer in mixers:
        check_cacheable(mixer)
    policies = [make_policy(name, mixer, **options) for mixer in mixers]
    device = next(model.parameters()).device
    for mixer, policy in zip(mixers, policies):
        mixer.cache_policy = policy.to(device)
    return policies


def remove_policy(model: nn.Module) -> None:
    """Back to the plain full KV cache."""
    for mixer in attention_mixers(model):
        if "cache_policy" in mixer._modules:
            del mixer._modules["cache_policy"]


def eviction_loss(model: nn.Module):
    """Sum of the attention gates' eviction-rate losses after a forward (0 when there are none)."""
    losses = [m.cache_policy.eviction_loss() for m in attention_mixers(model) if _gate(m)]
    return sum(losses) if losses else 0.0


def kept_fraction(model: nn.Module) -> float | None:
    """Mean kept fraction of the attention gates' last forward, or None without gates."""
    values = [float(m.cache_policy.last_keep.detach().mean()) for m in attention_mixers(model) if _gate(m)]
    return sum(values) / len(values) if values else None


def _gate(mixer) -> bool:
    return isinstance(getattr(mixer, "cache_policy", None), AttentionGatePolicy)


def cache_bytes(states: list) -> list[dict]:
    """Per layer: bytes allocated for keys and values ("held"), bytes of the kept tokens ("kept"), bytes of
    an attention gate's own decoding state ("gate", 0 without one) and the number of kept tokens summed
    over batch rows and KV heads."""
    out = []
    for state in states:
        if isinstance(state, PolicyCache):
            out.append({"held": state.nbytes, "kept": state.kept_nbytes, "gate": state.gate_nbytes,
                        "tokens": state.kept_tokens})  # fmt: skip
        elif hasattr(state, "nbytes"):
            tokens = state.k.shape[0] * state.k.shape[1] * state.k.shape[2]
            out.append({"held": state.nbytes, "kept": state.nbytes, "gate": 0, "tokens": tokens})
        else:
            raise TypeError(f"cache_bytes needs KV caches, got {type(state).__name__}")
    return out


__all__ = [
    "POLICIES",
    "MASKED",
    "AttentionGate",
    "AttentionGatePolicy",
    "CachePolicy",
    "H2OPolicy",
    "PolicyCache",
    "StreamingPolicy",
    "apply_policy",
    "attention_mixers",
    "cache_bytes",
    "check_cacheable",
    "eviction_loss",
    "kept_fraction",
    "make_policy",
    "remove_policy",
    "resolve_budget",
]
