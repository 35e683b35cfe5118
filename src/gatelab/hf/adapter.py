"""One adapter that puts a gatelab mixer where a transformers model calls its attention module, for every
family: it takes the attention call (hidden_states, attention_mask, cache, position_ids, ...), keeps the
mixer's own decoding state in the model's Cache, and folds a padding mask into the keys.

How the state travels: transformers hands each layer a ``Cache`` whose ``layers[layer_idx]`` holds that
layer's keys and values. The adapter swaps that entry for a :func:`gatelab_cache_layer` on first use, which
carries the gatelab state (a KVCache, a policy's cache, a sliding window's, a recurrent state) and tells
the model its length, so ``generate()``, position ids and masks work unchanged. What a gatelab state cannot
do is refused with a clear error: beam-search reordering and cropping (assisted decoding).

RoPE: the mixer rotates by its own positions (the tokens its state has seen), not by the model's
``position_embeddings``. A left-padded row is shifted as a whole, which RoPE (relative) does not see; the
adapter checks that each row's positions are consecutive over its real tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from gatelab.cache.policies import MASKED, with_key_bias
from gatelab.mixers._attention import AttentionMixer
from gatelab.mixers._kv_cache import PLAIN_CACHE, KVCacheManager


@functools.cache
def gatelab_cache_layer() -> type:
    """The transformers cache layer class that holds a gatelab mixer's state (built on first use, so that
    importing gatelab.hf needs no transformers)."""
    from transformers.cache_utils import DynamicLayer

    class GatelabCacheLayer(DynamicLayer):
        """A Cache layer holding ``state``, the gatelab mixer's decoding state (None before a call)."""

        is_croppable = False

        def __init__(self):
            super().__init__()
            self.state = None

        def update(self, key_states, value_states, *args, **kwargs):
            raise TypeError(
                "this cache layer holds a gatelab mixer's state; transformers keys cannot enter it"
            )

        def get_seq_length(self) -> int:
            return 0 if self.state is None else self.state.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.state = None

        def offload(self):
            pass

        def prefetch(self):
            pass

        def _unsupported(self, *args, **kwargs):
            raise NotImplementedError(
                "a gatelab mixer's decoding state cannot be reordered, repeated or cropped (beam search, "
                "assisted decoding); use greedy or sampling decoding"
            )

        reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    return GatelabCacheLayer


class PaddedKeys(KVCacheManager):
    """The plain KV cache, with padding keys hidden: visible (B, S) bool, False for a padding token, folded
    into the keys as a score bias (one extra q/k channel, as the cache policies do), so every mechanism's
    ``attend`` masks them without a mask argument."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible

    def update(self, mixer, state, q, k, v, x, positions):
        cache, q, keys, values = super().update(mixer, state, q, k, v, x, positions)
        S = keys.shape[1]
        if self.visible.shape[1] != S:
            raise ValueError(f"attention_mask covers {self.visible.shape[1]} keys, the cache holds {S}")
        bias = torch.where(self.visible, 0.0, MASKED).to(q.device)  # (B, S)
        q, keys = with_key_bias(q, keys, bias[:, :, None].expand(-1, -1, keys.shape[2]))
        return cache, q, keys, values


def visible_keys(attention_mask, batch: int, window: int | None = None) -> torch.Tensor | None:
    """The keys (B, S) bool that are not padding, from the mask a transformers model hands its attention
    layers (None: no mask; a 4D (B, 1, T, S) bool mask, True = attend, or an additive float one; a 2D (B, S)
    padding mask); None when no key is padding. A key that some query of the call sees is no padding (in a
    prefill every real key sees itself). ``window``: the layer's own sliding window in transformers, whose
    mask hides the keys that fell out of it from every query: those are not taken for padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            "attention_mask must be None or a tensor (eager or sdpa attention), got "
            f"{type(attention_mask).__name__}; load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.ndim not in (2, 4):
        raise ValueError(f"attention_mask must be (B, 1, T, S) or (B, S), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        seen = attention_mask
    elif attention_mask.is_floating_point() and attention_mask.ndim == 4:
        seen = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        seen = attention_mask > 0
    visible = seen.any(dim=-2)[:, 0] if seen.ndim == 4 else seen  # (B, S)
    visible = visible.expand(batch, -1).clone()
    if window is not None and attention_mask.ndim == 4:
        T, S = attention_mask.shape[-2:]
        visible[:, : max(0, S - T - window + 1)] = True  # out of every query's window, not padding
    return None if bool(visible.all()) else visible


def check_positions(position_ids, start: int, T: int, visible) -> None:
    """The mixer places the tokens of a row at consecutive positions from its state's length; position ids
    that are not consecutive over a row's real tokens (packed sequences, custom positions) are refused."""
    if position_ids is None:
        return
    offset = position_ids - torch.arange(start, start + T, device=position_ids.device)  # (B|1, T)
    real = torch.ones_like(offset, dtype=torch.bool) if visible is None else visible[:, -T:].to(offset.device)
    offset, real = torch.broadcast_tensors(offset, real)  # (B, T): one row of positions may serve all
    first = offset.masked_fill(~real, torch.iinfo(offset.dtype).min).amax(dim=1, keepdim=True)  # (B, 1)
    if bool((offset - first).masked_fill(~real, 0).any()):
        raise ValueError(
            "position_ids must be consecutive over each row's tokens (a gatelab mixer counts positions "
            "itself); packed sequences and custom positions are not supported"
        )


class HFAttention(nn.Module):
    """A gatelab ``mixer`` called as a transformers attention module:
    ``forward(hidden_states (B, T, hidden), attention_mask=None, cache=None, ...) -> (output, None)``.

    ``layer_idx`` is the entry of the model's Cache that holds the mixer's state; ``window`` the sliding
    window of the transformers layer it replaces (its masks hide old keys), None for full attention.
    Attention weights are not returned (None; a model's ``output_attentions`` stays empty): read them from
    the mixer with ``return_internals=True``.
    """

    def __init__(self, mixer: nn.Module, layer_idx: int, window: int | None = None):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx
        self.window = window
        self.is_causal = mixer.config.causal

    def cache_layer(self, cache):
        """This layer's entry of ``cache``, made a gatelab cache layer on first use."""
        layer_cls = gatelab_cache_layer()
        layers = cache.layers
        while len(layers) <= self.layer_idx:  # a cache that grows its layers lazily
            layers.append(layer_cls())
        layer = layers[self.layer_idx]
        if not isinstance(layer, layer_cls):
            if layer.get_seq_length() > 0:
                raise ValueError(
                    f"cache layer {self.layer_idx} already holds transformers keys; start from an empty Cache"
                )
            layer = layers[self.layer_idx] = layer_cls()
        return layer

    def forward(self, hidden_states, *args, attention_mask=None, cache=None, past_key_values=None,
                position_ids=None, **kwargs):  # fmt: skip
        cache = cache if cache is not None else past_key_values
        layer = None if cache is None else self.cache_layer(cache)
        state = None if layer is None else layer.state
        B, T, _ = hidden_states.shape
        visible = visible_keys(attention_mask, B, self.window)
        check_positions(position_ids, 0 if state is None else state.length, T, visible)
        if visible is None:
            y, state = self.mixer(hidden_states, state)
        else:
            y, state = self._padded(hidden_states, state, visible)
        if layer is not None:
            layer.state = state
        return y, None

    def _padded(self, x, state, visible):
        mixer = self.mixer
        if not isinstance(mixer, AttentionMixer) or mixer.cache_manager() is not PLAIN_CACHE:
            raise ValueError(
                f"padded batches need a mixer whose cache keeps every token; {mixer.mechanism}"
                f"{'' if mixer.cache_policy is None else ' under policy ' + repr(mixer.cache_policy.name)} "
                "does not: run unpadded batches (one sequence, or equal lengths)"
            )
        with mixer.cache_override(PaddedKeys(visible)):
            return mixer(x, state)


__all__ = ["HFAttention", "PaddedKeys", "gatelab_cache_layer", "visible_keys"]
