"""Pyramid Sparse Attention as a causal sequence mixer: PSA: Pyramid Sparse Attention for Efficient Video
Understanding and Generation (Li et al., 2025).

The parameters are those of the softmax mixer; ``attend`` sees each past key block at full resolution,
through 2x / 4x / 8x mean-pooled keys and values, or not at all, by importance under the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.psa import BACKENDS, DEFAULT_BUDGET, check_budget, psa
from gatelab.ops.psa.reference import psa_reference
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer
from ._base import check_positive


@dataclass
class PsaConfig(AttentionConfig):
    budget: tuple = DEFAULT_BUDGET  # fractions of past key blocks at level 1, 2, 4, 8; the rest skipped
    block_size_q: int = 1  # 1: decoding reproduces the parallel pass exactly (see ops.psa)
    block_size_k: int = 16  # a multiple of 8

    def __post_init__(self):
        super().__post_init__()
        self.budget = check_budget(self.budget)
        check_positive("block_size_q", self.block_size_q)
        check_positive("block_size_k", self.block_size_k)
        if self.block_size_k % 8:
            raise ValueError(
                f"block_size_k must be a multiple of 8 (the coarsest pooling level), got {self.block_size_k}"
            )
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {self.backend!r}")


class PsaAttention(AttentionMixer):
    config_cls = PsaConfig

    def options(self) -> dict:
        c = self.config
        return dict(
            budget=c.budget, block_size_q=c.block_size_q, block_size_k=c.block_size_k, causal=c.causal
        )

    def attend(self, q, k, v, x, extra, want_internals: bool):
        """q (B, T, H, D), k/v (B, S, Hkv, D) -> o (B, T, H, D); internals "attn" (B, H, T, S): the weight
        each key gets (a pooled key's probability shared equally by the tokens it averages) and "levels"."""
        c = self.config
        o = psa(q, k, v, backend=c.backend, **self.options())
        if not want_internals:
            return o, {}
        _, probs, levels = psa_reference(
            q, k, v, scale=q.shape[-1] ** -0.5, return_probs=True, **self.options()
        )
        return o, {"attn": probs, "levels": levels}


register(
    MechanismSpec(
        key="psa",
        family="sparse",
        config_cls=PsaConfig,
        module_cls=PsaAttention,
        op=psa,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (Li et al., 2025)",
        notes="block_size_q=1 keeps decode == parallel; the op is bidirectional too (video)",
        extra={"test_options": {"block_size_k": 8, "budget": (0.5, 0.0, 0.0, 0.5)}},
    )
)
