"""Shared machinery of the softmax-attention family: projections (GQA), optional QK-norm, RoPE, KV cache,
output projection. Mechanisms subclass :class:`AttentionMixer` and override ``project`` / ``attend``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.common.rope import apply_rope, rope_frequencies
from gatelab.ops.softmax import attention_probs

from ._base import HeadsConfig, Mixer, gpt2_init


@dataclass
class AttentionConfig(HeadsConfig):
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3, OLMo2)
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be > 0, got {self.rope_base}")


@dataclass
class KVCache:
    """Keys and values seen so far. k (B, S, Hkv, D) after RoPE, v (B, S, Hkv, V);
    ``length`` counts the tokens seen, which give the next token's position."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        return KVCache(torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1), self.length + k.shape[1])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class AttentionMixer(Mixer):
    config_cls = AttentionConfig

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        c = config
        H, Hkv, D = c.n_heads, c.kv_heads, c.dim
        self.q_proj = nn.Linear(c.d_model, H * D + self.extra_query_features(), bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, Hkv * D, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, Hkv * D, bias=c.bias)
        self.o_proj = nn.Linear(H * D, c.d_model, bias=c.bias)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=1e-6)
            self.k_norm = nn.RMSNorm(D, eps=1e-6)
        if c.rope:
            self.register_buffer("inv_freq", rope_frequencies(D, c.rope_base), persistent=False)

    # Hooks for subclasses -------------------------------------------------------------------------
    def extra_query_features(self) -> int:
        """Extra output features of q_proj (a gate fused into the query projection)."""
        return 0

    def split_query(self, q_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q_proj output (B, T, H*D + extra) -> q (B, T, H, D) and whatever the extra features hold."""
        B, T, _ = q_out.shape
        return q_out.view(B, T, self.config.n_heads, self.config.dim), None

    def prepare_kv(self, k, v, x) -> tuple[torch.Tensor, torch.Tensor]:
        """New keys/values (B, T, Hkv, D) before they enter the cache (e.g. a gate on the values)."""
        return k, v

    def attend(self, q, k, v, x, extra, want_internals: bool) -> tuple[torch.Tensor, dict]:
        """q (B, T, H, D), k/v (B, S, Hkv, D) -> o (B, T, H, D), internals. Default: plain softmax."""
        from gatelab.ops.softmax import softmax

        o = softmax(q, k, v, causal=self.config.causal, backend=self.config.backend)
        return o, (self.probs(q, k) if want_internals else {})

    # Shared pieces ---------------------------------------------------------------------------------
    def probs(self, q, k, **options) -> dict:
        return {"attn": attention_probs(q, k, causal=self.config.causal, **options)}

    def new_cache(self, k, v, state: KVCache | None) -> KVCache:
        if state is None:
            return KVCache(k, v, k.shape[1])
        if not isinstance(state, KVCache):
            raise TypeError(f"state must be the KVCache this mixer returned, got {type(state).__name__}")
        return state.append(k, v)

    def _forward(self, x, state, return_internals):
        policy = getattr(self, "cache_policy", None)  # set by gatelab.cache.apply_policy; None: full cache
        if policy is not None:
            return policy.run(self, x, state, return_internals)
        c = self.config
        B, T, _ = x.shape
        q, extra = self.split_query(self.q_proj(x))  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, c.kv_heads, c.dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, c.kv_heads, c.dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0 if state is None else state.length
        if c.rope:
            positions = torch.arange(start, start + T, device=x.device)
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        k, v = self.prepare_kv(k, v, x)
        cache = self.new_cache(k, v, state)
        o, internals = self.attend(q, cache.k, cache.v, x, extra, return_internals)
        y = self.o_proj(o.reshape(B, T, -1))
        return y, cache, internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        gpt2_init((self.q_proj, self.k_proj, self.v_proj), self.o_proj, std, n_layers)
