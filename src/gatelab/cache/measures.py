"""What the KV-cache policies of a model hold and cost: bytes per layer, the attention gates' kept fraction
and eviction-rate loss."""

from __future__ import annotations

import torch.nn as nn

from .apply import attention_mixers
from .attention_gate import AttentionGatePolicy
from .policies import PolicyCache


def eviction_loss(model: nn.Module):
    """Sum of the attention gates' eviction-rate losses after a forward (0 when there are none)."""
    losses = [policy.eviction_loss() for policy in _gates(model)]
    return sum(losses) if losses else 0.0


def kept_fraction(model: nn.Module) -> float | None:
    """Mean kept fraction of the attention gates' last forward, or None without gates."""
    values = [float(policy.last_keep.detach().mean()) for policy in _gates(model)]
    return sum(values) / len(values) if values else None


def _gates(model: nn.Module) -> list[AttentionGatePolicy]:
    policies = [getattr(mixer, "cache_policy", None) for mixer in attention_mixers(model)]
    return [policy for policy in policies if isinstance(policy, AttentionGatePolicy)]


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
