"""Clipped softmax attention: probabilities stretched to [gamma, zeta] and clipped to [0, 1], so a head
can put exactly zero weight on tokens without growing huge logits. "Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing" (Bondarenko et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.clipped_softmax import BACKENDS, check_clip_range, clipped_probs, clipped_softmax
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer
from ._base import check_positive


@dataclass
class ClippedSoftmaxConfig(AttentionConfig):
    zeta: float = 1.0
    alpha: float | None = 4.0  # gamma = -alpha / max_seq_len, the paper's parameterisation
    max_seq_len: int = 256  # the training sequence length T in gamma = -alpha / T
    gamma: float | None = None  # give gamma directly instead of alpha (then alpha must be None)

    def __post_init__(self):
        super().__post_init__()
        check_positive("max_seq_len", self.max_seq_len)
        if (self.alpha is None) == (self.gamma is None):
            raise ValueError(
                f"give exactly one of alpha or gamma, got alpha={self.alpha!r}, gamma={self.gamma!r}"
            )
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        check_clip_range(self.zeta, self.clip_gamma)

    @property
    def clip_gamma(self) -> float:
        return self.gamma if self.gamma is not None else -self.alpha / self.max_seq_len


class ClippedSoftmaxAttention(AttentionMixer):
    config_cls = ClippedSoftmaxConfig

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        o = clipped_softmax(q, k, v, zeta=c.zeta, gamma=c.clip_gamma, causal=c.causal, backend=c.backend)
        internals = {}
        if want_internals:
            internals["attn"] = clipped_probs(q, k, zeta=c.zeta, gamma=c.clip_gamma, causal=c.causal)
        return o, internals


register(
    MechanismSpec(
        key="clipped_softmax",
        family="softmax",
        config_cls=ClippedSoftmaxConfig,
        module_cls=ClippedSoftmaxAttention,
        op=clipped_softmax,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Quantizable Transformers (Bondarenko et al., 2023)",
    )
)
