"""KV-cache policies for decoding with softmax-family mixers: full, streaming, h2o, attention_gate, lychee
("In-context KV-Cache Eviction for LLMs via Attention-Gate", Zeng et al., 2024, and its baselines).

    policies = apply_policy(model, "h2o", budget=0.5, seq_len=512)   # every attention layer of an LM
    logits, states = model(idx)                                       # states are PolicyCache objects
    cache_bytes(states)                                               # bytes held per layer
    remove_policy(model)

The policies (``policies``, ``attention_gate``) are KV-cache managers of ``gatelab.mixers``: the attention
mixer's one forward asks them to update and evict its cache. ``apply`` plugs them in, ``measures`` reads
what they hold.
"""

from .apply import POLICIES, apply_policy, attention_mixers, check_cacheable, make_policy, remove_policy
from .attention_gate import AttentionGate, AttentionGatePolicy
from .lychee import LycheePolicy
from .measures import cache_bytes, eviction_loss, kept_fraction
from .policies import MASKED, CachePolicy, H2OPolicy, PolicyCache, StreamingPolicy, resolve_budget

__all__ = [
    "POLICIES",
    "MASKED",
    "AttentionGate",
    "AttentionGatePolicy",
    "CachePolicy",
    "H2OPolicy",
    "LycheePolicy",
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
