"""A learned keep/evict gate before a layer's attention ("In-context KV-Cache Eviction for LLMs via
Attention-Gate", Zeng et al., 2024): per token and KV head, evicted tokens are hidden from every query
and never stored.

Training (module in train mode): every token stays in the cache and the gate's sigmoid scores enter
the attention scores as log-gates, score_ij + log sigmoid(s_j). With ``relaxation="straight_through"``
(the default) the forward pass uses the hard flags (s > 0: bias 0, else MASKED), exactly what inference
does, and the backward pass the log-gate's gradient; ``"soft"`` uses log sigmoid(s_j) in the forward
too (measured here: a large gap between training and hard inference, see the report). The kept
fraction of each KV head is measured with straight-through hard flags for the eviction-rate loss
``eviction_weight * mean_heads (kept_head - target_keep) ** 2``: per head, so that no head keeps
everything while another keeps little (the cache is rectangular, padded to its longest head).
Inference (eval mode): hard flags; an evicted token's key gets a MASKED score (exp underflows to 0,
so it is hidden even from its own query) and is dropped from the cache after the chunk.

Where this differs from the paper: the gate reads a short causal window of the layer input (a
depthwise causal convolution, ``kernel`` tokens) instead of an attention over the whole context, so
its decoding state stays constant-size; the first token is always kept (an attention sink, and every
query then has at least one visible key, which makes the parallel and the token-by-token forms agree).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .policies import MASKED, CachePolicy, PolicyCache


class AttentionGate(nn.Module):
    """x (B, T, d_model) -> keep logits (B, T, Hkv), from a causal depthwise conv over a small projection."""

    def __init__(
        self, d_model: int, kv_heads: int, d_gate: int = 16, kernel: int = 4, init_keep: float = 0.9
    ):
        super().__init__()
        self.kernel = kernel
        self.proj = nn.Linear(d_model, d_gate)
        self.conv = nn.Parameter(torch.full((kernel, d_gate), 1.0 / kernel))
        self.out = nn.Linear(d_gate, kv_heads)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, math.log(init_keep / (1 - init_keep)))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None):
        """-> logits (B, T, Hkv), state (B, kernel - 1, d_gate): the last projected inputs."""
        B, T, _ = x.shape
        h = self.proj(x)  # (B, T, G)
        past = h.new_zeros(B, self.kernel - 1, h.shape[-1]) if state is None else state.to(h.dtype)
        seq = torch.cat([past, h], dim=1)  # (B, kernel - 1 + T, G)
        mixed = sum(seq[:, i : i + T] * self.conv[i] for i in range(self.kernel))  # (B, T, G)
        return self.out(F.silu(mixed)), seq[:, seq.shape[1] - (self.kernel - 1) :]


class AttentionGatePolicy(CachePolicy):
    """The Attention-Gate policy of one attention layer; its gate trains with the LM."""

    name = "attention_gate"

    def __init__(self, d_model: int, kv_heads: int, target_keep: float = 0.5, eviction_weight: float = 1.0,
                 d_gate: int = 16, kernel: int = 4, init_keep: float = 0.9, relaxation: str = "straight_through"):  # fmt: skip
        super().__init__()
        if (
            isinstance(target_keep, bool)
            or not isinstance(target_keep, int | float)
            or not 0 < target_keep <= 1
        ):
            raise ValueError(f"target_keep must be in (0, 1], got {target_keep!r}")
        if not isinstance(kernel, int) or kernel < 1:
            raise ValueError(f"kernel must be a positive int, got {kernel!r}")
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep!r}")
        if relaxation not in ("soft", "straight_through"):
            raise ValueError(f"relaxation must be 'soft' or 'straight_through', got {relaxation!r}")
        self.target_keep, self.eviction_weight = float(target_keep), float(eviction_weight)
        self.relaxation = relaxation
        self.gate = AttentionGate(d_model, kv_heads, d_gate, kernel, init_keep)
        self.last_keep: torch.Tensor | None = None  # (Hkv,) straight-through kept fractions, last forward

    def token_bias(self, mixer, x, state: PolicyCache | None, positions):
        logits, gate_state = self.gate(x, None if state is None else state.gate_state)  # (B, T, Hkv)
        first = (positions == 0).view(1, -1, 1)  # the first token is always kept
        hard = (logits > 0) | first
        if self.training:
            soft = torch.sigmoid(logits)
            flags = hard.float() + soft - soft.detach()  # straight-through: forward 0/1, backward sigmoid'
            # kept fraction per KV head: a per-head target keeps the heads' cache lengths (and the
            # padding of the rectangular cache) balanced
            self.last_keep = torch.where(first, torch.ones_like(flags), flags).mean(dim=(0, 1))  # (Hkv,)
            bias = F.logsigmoid(logits.float()).masked_fill(first, 0.0)
            if self.relaxation == "straight_through":  # forward: the hard mask; backward: the log-gate's
                hard_bias = torch.zeros_like(bias).masked_fill(~hard, MASKED)
                bias = hard_bias + bias - bias.detach()
        else:
            self.last_keep = hard.float().mean(dim=(0, 1))
            bias = torch.zeros(hard.shape, device=x.device).masked_fill(~hard, MASKED)
        return bias, gate_state

    def eviction_loss(self) -> torch.Tensor:
        """eviction_weight * mean over KV heads of (kept fraction - target_keep) ** 2 for the last forward
        (straight-through flags)."""
        if self.last_keep is None:
            raise RuntimeError("eviction_loss() needs a forward pass first")
        return self.eviction_weight * ((self.last_keep - self.target_keep) ** 2).mean()

    def evict(self, cache, probs):
        if self.training or cache.bias is None:
            return cache  # the relaxation keeps every token, weighted by its log-gate
        keep = cache.bias > MASKED / 2  # (B, S, Hkv)
        if bool(keep.all()):
            return cache
        kept = int(keep.sum(dim=1).max())
        # kept slots first, each row in position order (a stable sort of the 0/1 "evicted" flag)
        order = (~keep).to(torch.int8).sort(dim=1, stable=True).indices[:, :kept]
        out = cache.gather(order)
        valid = out.bias > MASKED / 2  # rows with fewer kept tokens than ``kept`` end with padding
        out.k = out.k * valid[..., None].to(out.k.dtype)  # padding holds no evicted token's key or value
        out.v = out.v * valid[..., None].to(out.v.dtype)
        return out

    def extra_repr(self) -> str:
        return f"target_keep={self.target_keep}, eviction_weight={self.eviction_weight}"
