"""KV-cache policies for softmax-family mixers: full, StreamingLLM's sinks + recent window, H2O's heavy
hitters + recent window. "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., 2024);
"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang et al., 2023).

A policy is the KVCacheManager plugged into an attention mixer's ``cache_policy`` slot: the mixer's one
forward asks it to ``update`` the cache with the new tokens (a chunk of T new tokens attends to every kept
key and causally to itself), runs its ``attend``, then asks it to ``evict`` (the cache is trimmed after
the chunk). Decoding token by token is the chunk of one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.mixers._kv_cache import KVCache, KVCacheManager
from gatelab.ops.common.rope import apply_rope

MASKED = -1e4  # additive score bias of a hidden key: exp underflows to exactly 0 in fp32 and bf16


@dataclass
class PolicyCache(KVCache):
    """A KV cache whose slots may hold any subset of the tokens seen, per batch row and KV head.

    k (B, S, Hkv, D) (after RoPE, or before it when ``rope_applied`` is False), v (B, S, Hkv, V);
    positions (B, S, Hkv) long: the absolute position of the token in each slot, slots in position order;
    bias (B, S, Hkv) fp32 additive score bias (0 kept, MASKED for padding) or None (every slot visible);
    scores (B, S, Hkv) fp32 accumulated attention (h2o) or None; gate_state: the attention gate's own
    decoding state or None. ``length`` counts the tokens seen.
    """

    positions: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    gate_state: KVCache | None = None
    rope_applied: bool = True
    policy: str = ""  # the policy that made it: a cache kept under one policy means nothing to another

    @property
    def kept_tokens(self) -> int:
        """Tokens actually held, summed over batch rows and KV heads (padding slots, position -1, excluded)."""
        return int((self.positions >= 0).sum())

    @property
    def kept_nbytes(self) -> int:
        """Bytes of the kept keys and values (``nbytes`` counts the allocated slots, padding included)."""
        per_token = self.k.shape[-1] * self.k.element_size() + self.v.shape[-1] * self.v.element_size()
        return self.kept_tokens * per_token

    @property
    def gate_nbytes(self) -> int:
        """Bytes of the attention gate's own decoding state (0 without a gate)."""
        return 0 if self.gate_state is None else self.gate_state.nbytes

    def slots(self, bias: torch.Tensor | None) -> torch.Tensor:
        """The position of each row inside the cache, counting visible rows only (``bias`` (B, S, Hkv) as the
        queries see it, or None: all visible): (S,) when every row is visible, else (B, S, Hkv) long, the
        exclusive running count of visible rows (a hidden row gets the slot the next visible row will take).
        Rotating by these gives the distances of a cache without padding or hidden rows, the same in a
        parallel pass and token by token."""
        if bias is None:
            return torch.arange(self.k.shape[1], device=self.k.device)
        visible = (bias > MASKED / 2).long()
        return visible.cumsum(dim=1) - visible

    def gather(self, index: torch.Tensor) -> PolicyCache:
        """Keep the slots ``index`` (B, S', Hkv) long (per batch row and KV head), or (S',) long (the same
        slots for every row and head: an index_select, several times cheaper than a gather), in that order."""
        if index.ndim == 1:
            take = lambda t: None if t is None else t.index_select(1, index)
            take4 = take
        else:
            take = lambda t: None if t is None else t.gather(1, index)
            take4 = lambda t: t.gather(1, index[..., None].expand(-1, -1, -1, t.shape[-1]))
        return PolicyCache(
            take4(self.k),
            take4(self.v),
            self.length,
            positions=take(self.positions),
            bias=take(self.bias),
            scores=take(self.scores),
            gate_state=self.gate_state,
            rope_applied=self.rope_applied,
            policy=self.policy,
            signature=self.signature,
        )


def check_flag(name: str, value) -> bool:
    """A policy's on/off option: True or False only (``"no"`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def resolve_budget(name: str, budget, seq_len: int | None) -> int:
    """Tokens from a budget: an int >= 1, or a float fraction in (0, 1] of ``seq_len``."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"{name} must be an int (tokens) or a float fraction, got {type(budget).__name__}")
    if not math.isfinite(budget):
        raise ValueError(f"{name} must be a finite number (tokens, or a fraction in (0, 1]), got {budget!r}")
    if budget <= 0:
        raise ValueError(f"{name} must be > 0 (tokens, or a fraction in (0, 1]), got {budget!r}")
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(f"{name} as a fraction must be in (0, 1], got {budget!r}; give tokens as an int")
        if seq_len is None or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"{name}={budget} is a fraction: give seq_len (a positive int), got {seq_len!r}")
        return max(1, round(budget * seq_len))
    return budget


def with_key_bias(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an additive per-key score bias into one extra q/k channel, so every mixer's ``attend`` (and its
    default scale (D + 1) ** -0.5) computes q.k * D ** -0.5 + bias without a mask argument.

    q (B, T, H, D), k (B, S, Hkv, D), bias (B, S, Hkv) -> q' (B, T, H, D + 1), k' (B, S, Hkv, D + 1).
    """
    D = q.shape[-1]
    q2 = torch.cat([q * math.sqrt((D + 1) / D), q.new_ones(*q.shape[:-1], 1)], dim=-1)
    k2 = torch.cat([k, (bias * math.sqrt(D + 1)).to(k.dtype)[..., None]], dim=-1)
    return q2, k2


class CachePolicy(KVCacheManager, nn.Module):
    """The full cache (every token kept) as a PolicyCache; subclasses override ``token_bias``,
    ``visible_bias`` and ``evict``."""

    name = "full"
    state_cls = PolicyCache
    needs_probs = False  # evict() reads the new queries' attention probabilities
    rope_by_cache_position = False  # keys cached before RoPE, rotated at attend time by their slot

    def token_bias(self, mixer, x, state: PolicyCache | None, positions):
        """Score bias (B, T, Hkv) of the new tokens as keys (None: all visible) and the gate state."""
        return None, None

    def visible_bias(self, cache: PolicyCache, positions: torch.Tensor) -> torch.Tensor | None:
        """Score bias (B, S, Hkv) of the cache rows as the new queries at ``positions`` (T,) see them, or None
        (all visible). Default: the bias stored with the rows."""
        return cache.bias

    def evict(self, cache: PolicyCache, probs: torch.Tensor | None) -> PolicyCache:
        """cache holds the kept tokens and the new chunk; probs (B, H, T, S) of the new queries or None."""
        return cache

    def check_state(self, mixer, state, batch: int) -> None:
        if not mixer.config.causal:
            raise ValueError(f"cache policy {self.name!r} needs a causal mixer; this one has causal=False")
        super().check_state(mixer, state, batch)
        if state is not None and state.policy != self.name:
            raise ValueError(
                f"state was kept under cache policy {state.policy!r}, this mixer runs policy {self.name!r}: "
                "decode with the policy that made the cache, or start from state=None"
            )

    def update(self, mixer, state, q, k, v, x, positions):
        """The kept rows plus the new tokens (their positions, biases, the gate state), and the queries and
        keys that see them: rotated by their slot with ``rope_by_cache_position``, and with the score bias
        folded into an extra channel where a row is hidden or weighted."""
        c = mixer.config
        B, T = k.shape[:2]
        late_rope = c.rope and self.rope_by_cache_position
        bias, gate_state = self.token_bias(mixer, x, state, positions)
        new_pos = positions.view(1, T, 1).expand(B, T, c.kv_heads)
        if state is None:
            cache = PolicyCache(k, v, T, new_pos, bias, gate_state=gate_state, rope_applied=not late_rope,
                                policy=self.name, signature=mixer.state_signature(B))  # fmt: skip
        else:
            old_bias = state.bias
            if old_bias is not None or bias is not None:  # one side may have no bias: all visible
                old_bias = (
                    torch.zeros(state.positions.shape, device=x.device) if old_bias is None else old_bias
                )
                bias = torch.zeros(B, T, c.kv_heads, device=x.device) if bias is None else bias
                bias = torch.cat([old_bias, bias], dim=1)
            cache = PolicyCache(
                torch.cat([state.k, k], dim=1),
                torch.cat([state.v, v], dim=1),
                state.length + T,
                torch.cat([state.positions, new_pos], dim=1),
                bias,
                scores=state.scores,
                gate_state=gate_state,
                rope_applied=state.rope_applied,
                policy=state.policy,
                signature=state.signature,
            )
        keys, bias = cache.k, self.visible_bias(cache, positions)
        if late_rope:  # StreamingLLM: positions inside the cache, not in the text
            slots = cache.slots(bias)  # (S,) or (B, S, Hkv)
            if slots.ndim == 1:
                q_slots = slots[-T:]
            else:  # per KV head -> per query head (grouped-query heads share a KV head)
                q_slots = slots[:, -T:].repeat_interleave(c.n_heads // c.kv_heads, dim=2)
            keys, q = apply_rope(keys, slots, mixer.inv_freq), apply_rope(q, q_slots, mixer.inv_freq)
        if bias is not None and bool((bias != 0).any()):
            q, keys = with_key_bias(q, keys, bias)
        return cache, q, keys, cache.v

    def internals(self, cache: PolicyCache) -> dict:
        return {"kept_positions": cache.positions}

    def extra_repr(self) -> str:
        return self.name


class StreamingPolicy(CachePolicy):
    """Keep the first ``sinks`` tokens and the last ``window`` tokens (budget = sinks + window). With
    ``rope_by_cache_position`` keys are cached before RoPE and rotated by their slot in the cache."""

    name = "streaming"

    def __init__(self, budget, sinks: int = 4, window: int | None = None, seq_len: int | None = None,
                 rope_by_cache_position: bool = True):  # fmt: skip
        super().__init__()
        self.budget = resolve_budget("budget", budget, seq_len)
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        sinks = min(sinks, self.budget - 1) if window is None else sinks
        window = self.budget - sinks if window is None else window
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if sinks + window > self.budget:
            raise ValueError(
                f"window ({window}) + sinks ({sinks}) is larger than the budget ({self.budget} tokens)"
            )
        self.sinks, self.window = sinks, window
        self.rope_by_cache_position = check_flag("rope_by_cache_position", rope_by_cache_position)

    def evict(self, cache, probs):
        S = cache.k.shape[1]
        if S <= self.sinks + self.window:
            return cache
        slots = torch.cat([torch.arange(self.sinks), torch.arange(S - self.window, S)]).to(cache.k.device)
        return cache.gather(slots)

    def extra_repr(self) -> str:
        return (
            f"sinks={self.sinks}, window={self.window}, rope_by_cache_position={self.rope_by_cache_position}"
        )


class H2OPolicy(CachePolicy):
    """Keep per KV head the ``recent`` newest tokens plus the ``budget - recent`` older tokens with the
    largest attention received so far (column sums of the probabilities, summed over the group's heads)."""

    name = "h2o"
    needs_probs = True

    def __init__(self, budget, recent=0.5, seq_len: int | None = None):
        super().__init__()
        self.budget = resolve_budget("budget", budget, seq_len)
        if isinstance(recent, float) and not isinstance(recent, bool):
            if not 0 <= recent <= 1:
                raise ValueError(f"recent as a fraction of the budget must be in [0, 1], got {recent!r}")
            recent = int(recent * self.budget)
        if not isinstance(recent, int) or isinstance(recent, bool) or recent < 0:
            raise ValueError(f"recent must be an int >= 0 or a fraction of the budget, got {recent!r}")
        if recent > self.budget:
            raise ValueError(f"recent window ({recent}) is larger than the budget ({self.budget} tokens)")
        self.recent = recent

    def evict(self, cache, probs):
        B, S, Hkv = cache.positions.shape
        H, T = probs.shape[1], probs.shape[2]
        received = probs.float().view(B, Hkv, H // Hkv, T, S).sum(dim=(2, 3)).transpose(1, 2)  # (B, S, Hkv)
        old = cache.scores
        if old is not None:
            received[:, : old.shape[1]] += old
        cache.scores = received
        if S <= self.budget:
            return cache
        older = S - self.recent
        heavy = received[:, :older].topk(self.budget - self.recent, dim=1).indices  # (B, heavy, Hkv)
        recent = torch.arange(older, S, device=received.device).view(1, -1, 1).expand(B, -1, Hkv)
        index = torch.cat([heavy.sort(dim=1).values, recent], dim=1)  # slots stay in position order
        return cache.gather(index)

    def extra_repr(self) -> str:
        return f"budget={self.budget}, recent={self.recent}"
