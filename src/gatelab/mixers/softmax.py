"""Softmax attention (Attention Is All You Need, Vaswani et al., 2017), with GQA, RoPE and optional
QK-norm: the baseline every gate is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.softmax import BACKENDS, softmax
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer


@dataclass
class SoftmaxConfig(AttentionConfig):
    pass


class SoftmaxAttention(AttentionMixer):
    config_cls = SoftmaxConfig


register(
    MechanismSpec(
        key="softmax",
        family="softmax",
        config_cls=SoftmaxConfig,
        module_cls=SoftmaxAttention,
        op=softmax,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Attention Is All You Need (Vaswani et al., 2017)",
    )
)
