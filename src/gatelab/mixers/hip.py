"""HiP attention as a drop-in for softmax attention: A Training-Free Sub-quadratic Cost Transformer Model
Serving Framework With Hierarchically Pruned Attention (Lee et al., 2024).

Training-free: the parameters are exactly those of the softmax mixer, so a pretrained softmax layer's
weights load as they are; only ``attend`` changes, to HiP's hierarchically pruned block mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.hip import BACKENDS, hip, hip_select
from gatelab.ops.hip.reference import hip_reference
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer
from ._base import check_positive


@dataclass
class HipConfig(AttentionConfig):
    topk: int = 8  # key blocks kept per query block (besides sinks and the local window)
    block_size_q: int = 1  # 1: decoding reproduces the parallel pass exactly (see ops.hip)
    block_size_k: int = 16
    sinks: int = 4
    window: int = 16

    def __post_init__(self):
        super().__post_init__()
        for name in ("topk", "block_size_q", "block_size_k"):
            check_positive(name, getattr(self, name))
        for name in ("sinks", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {self.backend!r}")


class HipAttention(AttentionMixer):
    config_cls = HipConfig

    def options(self) -> dict:
        c = self.config
        return dict(
            topk=c.topk,
            block_size_q=c.block_size_q,
            block_size_k=c.block_size_k,
            sinks=c.sinks,
            window=c.window,
            causal=c.causal,
        )

    def attend(self, q, k, v, x, extra, want_internals: bool):
        """q (B, T, H, D), k/v (B, S, Hkv, D) -> o (B, T, H, D); internals "attn" (B, H, T, S) and
        "selected" (B, H, nQ, nK) key blocks."""
        c = self.config
        if not want_internals:
            return hip(q, k, v, backend=c.backend, **self.options()), {}
        scale = q.shape[-1] ** -0.5
        _, probs = hip_reference(q, k, v, scale=scale, return_probs=True, **self.options())
        o = hip(q, k, v, backend=c.backend, **self.options())
        options = {key: value for key, value in self.options().items() if key not in ("sinks", "window")}
        return o, {"attn": probs, "selected": hip_select(q, k, scale=scale, **options)}


register(
    MechanismSpec(
        key="hip",
        family="sparse",
        config_cls=HipConfig,
        module_cls=HipAttention,
        op=hip,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned "
        "Attention (Lee et al., 2024)",
        notes="training-free: same parameters as softmax; block_size_q=1 keeps decode == parallel",
        extra={"test_options": {"topk": 2, "block_size_k": 2, "sinks": 1, "window": 2}},
    )
)
