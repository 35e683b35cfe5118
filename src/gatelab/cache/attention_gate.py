"""A learned keep/evict gate before a layer's attention ("In-context KV-Cache Eviction for LLMs via
Attention-Gate", Zeng et al., 2024): per token and KV head, evicted tokens are hidden from every query
and never stored.

Training (module in train mode): every token stays in the cache and the gate's sigmoid scores enter
the attention scores as log-gates, score_ij + log sigmoid(s_j). With ``relaxation="straight_through"``
(the default) the forward pass uses the hard flags (s > 0: bias 0, else MASKED), exactly what inference
does, and the backward pass the log-gate's gradient; ``"soft"`` uses log sigmoid(s_j) in the forward
too (measured here: a large gap between training and hard inference, see the report). The kept
fraction of each sequence and KV head is measured with straight-through hard flags for the eviction-rate
loss ``eviction_weight * mean_{b,h} (kept_bh - target_keep) ** 2``: per sequence and head, so that none
keeps everything while another keeps little (the cache is rectangular, padded to its longest row: on
MQAR at half the cache, one ``gatelab cache`` run each: a per-head target held 1.12 of the full cache's
bytes, this one 0.67).
Inference (eval mode): hard flags; an evicted token's key gets a MASKED score (exp underflows to 0,
so it is hidden even from its own query) and is dropped from the cache after the chunk.

The gate is the paper's reduced attention MHA': ``heads`` causal attention heads of width ``d_gate`` over the
layer input (no RoPE), whose output, plus a linear read of the token itself, gives one keep logit per KV
head. It keeps its own small decoding cache of gate keys and values (2 * heads * d_gate numbers per token,
against 2 * kv_heads * head_dim for the layer's cache), counted in the bytes a layer holds; ``window``
bounds it to the last ``window`` tokens (None: the whole context, as in the paper). Where this differs
from the paper: its attention is causal (the paper reads the whole prompt at prefill), so that a flag never
depends on later tokens and the parallel, chunked and token-by-token forms agree; the first token is always
kept (an attention sink, and every query then has at least one visible key); and by default
(``rope_by_cache_position=True``) keys are cached before RoPE and rotated by their slot among the kept
tokens of their head, as StreamingLLM does, in training too (the slots are running counts of the hard
flags), so that a cache that keeps a fraction f of T tokens spans f * T positions. On text at 4x the
training length, 50% kept (one-off script, dev CPU, 2026-11-30, hard flags in one parallel pass): loss
1.96-2.03 over fine-tuning seeds 0-2 with cache positions, 2.21-2.31 in two runs with text positions.

``recent`` (0 = off, the paper's semantics) is an extension: the sequence is cut into blocks of
``recent`` tokens and an evicted token stays visible to the queries of its own block and the next one
before it leaves the cache (the cache holds the kept tokens plus ``recent`` to 2 * ``recent`` recent ones).
Every query of a block sees the same rows, so a call is cut at block boundaries and each piece takes a
per-row bias: parallel, chunked and token-by-token decoding agree exactly. A byte-level LM needs its last
few tokens, which a per-token keep/evict flag cannot keep as a whole; with ``recent=16`` the gate beat
StreamingLLM and H2O on text at half the cache in ``gatelab cache`` (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.mixers._kv_cache import KVCache
from gatelab.ops.common.checks import check_number
from gatelab.ops.softmax import softmax

from .policies import MASKED, CachePolicy, PolicyCache, check_flag


class AttentionGate(nn.Module):
    """MHA': x (B, T, d_model) -> keep logits (B, T, Hkv), from causal attention over the context.

    logits = direct(x) + out(attention(q, k, v)), q/k/v = qkv(x) split into ``heads`` heads of ``d_gate``;
    ``direct``'s bias starts every flag at sigmoid = init_keep, ``out`` starts near 0.
    """

    def __init__(self, d_model: int, kv_heads: int, heads: int = 1, d_gate: int = 8,
                 window: int | None = None, init_keep: float = 0.9):  # fmt: skip
        super().__init__()
        self.heads, self.d_gate, self.window = heads, d_gate, window
        self.qkv = nn.Linear(d_model, 3 * heads * d_gate)
        self.direct = nn.Linear(d_model, kv_heads)
        self.out = nn.Linear(heads * d_gate, kv_heads, bias=False)
        nn.init.normal_(self.direct.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.direct.bias, math.log(init_keep / (1 - init_keep)))

    def forward(self, x: torch.Tensor, state: KVCache | None):
        """-> logits (B, T, Hkv), state: the gate's KVCache (k, v (B, S, heads, d_gate)), trimmed to the
        last ``window - 1`` tokens when ``window`` is set."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.d_gate).unbind(2)  # (B, T, heads, d_gate)
        cache = KVCache(k, v, T) if state is None else state.append(k, v)
        o = softmax(q, cache.k, cache.v, causal=True, window=self.window)  # (B, T, heads, d_gate)
        if self.window is not None and cache.k.shape[1] > self.window - 1:
            keep = self.window - 1  # all that the next query can see
            cache = KVCache(cache.k[:, cache.k.shape[1] - keep :], cache.v[:, cache.v.shape[1] - keep :],
                            cache.length)  # fmt: skip
        return self.direct(x) + self.out(o.reshape(B, T, -1)), cache


class AttentionGatePolicy(CachePolicy):
    """The Attention-Gate policy of one attention layer; its gate trains with the LM.

    target_keep: kept fraction the eviction-rate loss aims at, per KV head, in (0, 1]; eviction_weight: its
    weight; heads, d_gate, window, init_keep: the gate (:class:`AttentionGate`); relaxation: "soft" or
    "straight_through" (training forward); rope_by_cache_position: rotate keys by their slot among the
    visible rows; recent: block size of the recent window (0: off). See the module docstring.
    """

    name = "attention_gate"

    def __init__(self, d_model: int, kv_heads: int, target_keep: float = 0.5, eviction_weight: float = 1.0,
                 heads: int = 1, d_gate: int = 8, window: int | None = None, init_keep: float = 0.9,
                 relaxation: str = "straight_through", rope_by_cache_position: bool = True,
                 recent: int = 0):  # fmt: skip
        super().__init__()
        if (
            isinstance(target_keep, bool)
            or not isinstance(target_keep, int | float)
            or not 0 < target_keep <= 1
        ):
            raise ValueError(f"target_keep must be in (0, 1], got {target_keep!r}")
        for name, value in (("heads", heads), ("d_gate", d_gate)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"window must be a positive int (tokens the gate reads) or None, got {window!r}")
        if not isinstance(recent, int) or isinstance(recent, bool) or recent < 0:
            raise ValueError(f"recent must be an int >= 0 (tokens per block, 0: off), got {recent!r}")
        if not 0 < check_number("init_keep", init_keep) < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep!r}")
        if relaxation not in ("soft", "straight_through"):
            raise ValueError(f"relaxation must be 'soft' or 'straight_through', got {relaxation!r}")
        self.target_keep = float(target_keep)
        self.eviction_weight = check_number("eviction_weight", eviction_weight, low=0)
        self.relaxation = relaxation
        self.rope_by_cache_position = check_flag("rope_by_cache_position", rope_by_cache_position)
        self.recent = recent
        self.gate = AttentionGate(d_model, kv_heads, heads, d_gate, window, init_keep)
        self.last_keep: torch.Tensor | None = None  # (B, Hkv) straight-through kept fractions, last forward

    def token_bias(self, mixer, x, state: PolicyCache | None, positions):
        logits, gate_state = self.gate(x, None if state is None else state.gate_state)  # (B, T, Hkv)
        first = (positions == 0).view(1, -1, 1)  # the first token is always kept
        hard = (logits > 0) | first
        if self.training:
            soft = torch.sigmoid(logits)
            flags = hard.float() + soft - soft.detach()  # straight-through: forward 0/1, backward sigmoid'
            # kept fraction per sequence and KV head: a target for each keeps their cache lengths (and the
            # padding of the rectangular cache, sized by the longest) balanced
            self.last_keep = torch.where(first, torch.ones_like(flags), flags).mean(dim=1)  # (B, Hkv)
            bias = F.logsigmoid(logits.float()).masked_fill(first, 0.0)
            if self.relaxation == "straight_through":  # forward: the hard mask; backward: the log-gate's
                hard_bias = torch.zeros_like(bias).masked_fill(~hard, MASKED)
                bias = hard_bias + bias - bias.detach()
        else:
            self.last_keep = hard.float().mean(dim=1)
            bias = torch.zeros(hard.shape, device=x.device).masked_fill(~hard, MASKED)
        return bias, gate_state

    def eviction_loss(self) -> torch.Tensor:
        """eviction_weight * mean over sequences and KV heads of (kept fraction - target_keep) ** 2 for the
        last forward (straight-through flags)."""
        if self.last_keep is None:
            raise RuntimeError("eviction_loss() needs a forward pass first")
        return self.eviction_weight * ((self.last_keep - self.target_keep) ** 2).mean()

    def cuts(self, start, T, return_internals):
        """With ``recent`` blocks, a call is cut at block boundaries: every query of a piece shares one block,
        so the rows it sees take a per-row bias."""
        first_end = (start // self.recent + 1) * self.recent if self.recent else start + T
        if start + T <= first_end:
            return [0, T]
        if return_internals:
            raise ValueError(
                f"attention_gate with recent={self.recent} returns internals only for a call inside one block "
                f"of {self.recent} tokens; got tokens {start}..{start + T - 1}"
            )
        self._keeps = []
        return [0, *range(first_end - start, T, self.recent), T]

    def end_piece(self, tokens):
        self._keeps.append(self.last_keep * tokens)

    def end_call(self, tokens):
        self.last_keep = sum(self._keeps) / tokens  # the eviction-rate loss covers the whole call
        del self._keeps

    def _recent_rows(self, cache: PolicyCache, block: int) -> torch.Tensor:
        """(B, S, Hkv) bool: rows holding a token of block ``block - 1`` or later (padding excluded)."""
        return (cache.positions >= 0) & (cache.positions // self.recent >= block - 1)

    def visible_bias(self, cache, positions):
        if not self.recent or cache.bias is None:
            return cache.bias
        block = int(positions[0]) // self.recent  # cuts() keeps every query of a piece in one block
        return cache.bias.masked_fill(self._recent_rows(cache, block), 0.0)

    def evict(self, cache, probs):
        if self.training or cache.bias is None:
            return cache  # the relaxation keeps every token, weighted by its log-gate
        keep = cache.bias > MASKED / 2  # (B, S, Hkv)
        if self.recent:  # evicted tokens of the recent blocks stay until the next query stops seeing them
            keep = keep | self._recent_rows(cache, cache.length // self.recent)
        if bool(keep.all()):
            return cache
        kept = int(keep.sum(dim=1).max())
        # kept slots first, each row in position order (a stable sort of the 0/1 "evicted" flag)
        order = (~keep).to(torch.int8).sort(dim=1, stable=True).indices[:, :kept]
        out = cache.gather(order)
        valid = keep.gather(1, order)  # rows with fewer kept tokens than ``kept`` end with padding
        out.k = out.k * valid[..., None].to(out.k.dtype)  # padding holds no evicted token's key or value
        out.v = out.v * valid[..., None].to(out.v.dtype)
        out.positions = out.positions.masked_fill(~valid, -1)
        out.bias = out.bias.masked_fill(~valid, MASKED)
        return out

    def extra_repr(self) -> str:
        g = self.gate
        return (
            f"target_keep={self.target_keep}, eviction_weight={self.eviction_weight}, heads={g.heads}, "
            f"d_gate={g.d_gate}, window={g.window}, recent={self.recent}"
        )
