"""Shared machinery of the softmax-attention family: projections (GQA), optional QK-norm, RoPE, KV cache,
output projection. Mechanisms subclass :class:`AttentionMixer` and override its hooks (``split_query``,
``prepare_kv``, ``attend``); the one forward asks a :class:`KVCacheManager` to update and evict the cache."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gatelab.ops.common.rope import apply_rope, rope_frequencies
from gatelab.ops.softmax import attention_probs

from ._base import HeadsConfig, Mixer, gpt2_init
from ._kv_cache import PLAIN_CACHE, KVCache, KVCacheManager


@dataclass
class AttentionConfig(HeadsConfig):
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3, OLMo2)
    rope: bool = True
    rope_base: float = 10000.0
    bias: bool = False
    qkv_bias: bool | None = None  # biases on q/k/v only; None: as ``bias`` (Qwen2: q/k/v biased, output not)
    qk_norm_eps: float = 1e-6
    rope_dims: int | None = None  # leading channels of each head that RoPE rotates (partial RoPE); None: all

    def __post_init__(self):
        super().__post_init__()
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be > 0, got {self.rope_base}")
        if self.qk_norm_eps <= 0:
            raise ValueError(f"qk_norm_eps must be > 0, got {self.qk_norm_eps}")
        rope_dims = self.rope_dims
        if rope_dims is not None and (rope_dims < 2 or rope_dims % 2 or rope_dims > self.dim):
            raise ValueError(
                f"rope_dims must be an even int in [2, head dim {self.dim}] or None, got {rope_dims}"
            )

    @property
    def input_bias(self) -> bool:
        """Whether q/k/v carry biases."""
        return self.bias if self.qkv_bias is None else self.qkv_bias


class AttentionMixer(Mixer):
    """The softmax-family mixer: x -> q, k, v (GQA), QK-norm, RoPE, the KV cache (update), ``attend``, the
    cache again (evict), output projection.

    ``cache_policy`` is a slot for a KV-cache policy (gatelab.cache.apply_policy): a KVCacheManager module
    that replaces ``own_cache()``. A mechanism whose attention relies on its own cache declares
    ``accepts_cache_policy = False`` and returns that cache from ``own_cache``.
    """

    config_cls = AttentionConfig
    accepts_cache_policy: ClassVar[bool] = True

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        c = config
        H, Hkv, D = c.n_heads, c.kv_heads, c.dim
        self.q_proj = nn.Linear(c.d_model, H * D + self.extra_query_features(), bias=c.input_bias)
        self.k_proj = nn.Linear(c.d_model, Hkv * D, bias=c.input_bias)
        self.v_proj = nn.Linear(c.d_model, Hkv * D, bias=c.input_bias)
        self.o_proj = nn.Linear(H * D, c.d_model, bias=c.bias)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=c.qk_norm_eps)
            self.k_norm = nn.RMSNorm(D, eps=c.qk_norm_eps)
        if c.rope:  # apply_rope leaves the channels past 2 * len(inv_freq) unrotated
            self.register_buffer(
                "inv_freq", rope_frequencies(c.rope_dims or D, c.rope_base), persistent=False
            )

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

    def own_cache(self) -> KVCacheManager:
        """The cache used without a policy: the plain one, which keeps every token."""
        return PLAIN_CACHE

    @property
    def cache_policy(self) -> KVCacheManager | None:
        """The KV-cache policy plugged into this mixer, or None (its own cache). Set with
        :meth:`set_cache_policy` (or by assigning the module)."""
        return self._modules.get("cache_policy")

    @cache_policy.setter
    def cache_policy(self, policy) -> None:  # a module is stored by nn.Module.__setattr__ without this
        self.set_cache_policy(policy)

    def set_cache_policy(self, policy: KVCacheManager | None) -> None:
        """Plug a policy module in (its parameters train and save with the mixer), or take it out (None)."""
        if policy is None:
            self._modules.pop("cache_policy", None)
            return
        self._check_policy(policy)
        self._modules["cache_policy"] = policy  # add_module refuses a name the class defines (the property)

    def check_accepts_policy(self) -> None:
        """TypeError when this mechanism declares that its attention needs its own cache."""
        if not self.accepts_cache_policy:
            raise TypeError(f"{type(self).__name__} manages its own KV cache; a cache policy cannot be applied "
                            "to it")  # fmt: skip

    def _check_policy(self, policy) -> None:
        self.check_accepts_policy()
        if not isinstance(policy, KVCacheManager):
            raise TypeError(
                f"cache_policy must be a KVCacheManager (gatelab.cache), got {type(policy).__name__}"
            )

    @contextlib.contextmanager
    def cache_override(self, manager: KVCacheManager):
        """Run the calls inside the ``with`` under ``manager`` instead of the policy or own cache (the HF
        bridge folds a padding mask into the keys this way); the mixer's own setting is back afterwards."""
        if not isinstance(manager, KVCacheManager):
            raise TypeError(f"manager must be a KVCacheManager, got {type(manager).__name__}")
        self.__dict__["_cache_override"] = manager
        try:
            yield self
        finally:
            self.__dict__.pop("_cache_override", None)

    def cache_manager(self) -> KVCacheManager:
        """The manager of :meth:`cache_override` while one is active, else the policy, if one is set, else
        ``own_cache()``."""
        override = self.__dict__.get("_cache_override")
        if override is not None:
            return override
        policy = self.cache_policy
        if policy is None:
            return self.own_cache()
        self._check_policy(policy)
        return policy

    def _forward(self, x, state, return_internals):
        cache = self.cache_manager()
        B, T, _ = x.shape
        cache.check_state(self, state, B)
        start = 0 if state is None else state.length
        cuts = cache.cuts(start, T, return_internals)
        if len(cuts) == 2:
            return self._forward_piece(cache, x, state, start, return_internals)
        ys = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            y, state, _ = self._forward_piece(cache, x[:, a:b], state, start + a, False)
            cache.end_piece(b - a)
            ys.append(y)
        cache.end_call(T)
        return torch.cat(ys, dim=1), state, {}

    def _forward_piece(self, cache: KVCacheManager, x, state, start: int, return_internals: bool):
        """x (B, T, d_model) whose first token is at position ``start`` -> y (B, T, d_model), the cache
        after it, internals."""
        c = self.config
        B, T, _ = x.shape
        q, extra = self.split_query(self.q_proj(x))  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, c.kv_heads, c.dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, c.kv_heads, c.dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = torch.arange(start, start + T, device=x.device)
        if c.rope and not cache.rope_by_cache_position:
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        k, v = self.prepare_kv(k, v, x)
        new_cache, q, keys, values = cache.update(self, state, q, k, v, x, positions)
        want = return_internals or cache.needs_probs
        o, internals = self.attend(q, keys, values, x, extra, want)
        probs = internals.get("attn") if want else None
        if cache.needs_probs and probs is None:
            raise TypeError(f"cache policy {cache.name!r} needs attention probabilities, but "
                            f"{type(self).__name__}.attend returns no 'attn' internals")  # fmt: skip
        new_cache = cache.evict(new_cache, probs)
        y = self.o_proj(o.reshape(B, T, -1))
        if not return_internals:
            return y, new_cache, {}
        return y, new_cache, {**internals, **cache.internals(new_cache)}

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        gpt2_init((self.q_proj, self.k_proj, self.v_proj), self.o_proj, std, n_layers)


__all__ = ["AttentionConfig", "AttentionMixer", "KVCache"]
