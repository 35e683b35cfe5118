"""Memora layer: the Miras memory with rows on the simplex, learnt by a KL-retention (softmax) step (It's
All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization, Behrouz et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.memora import BACKENDS, memora
from gatelab.registry import MechanismSpec, register

from ._miras import MirasConfig, MirasMixer


@dataclass
class MemoraConfig(MirasConfig):
    pass


class Memora(MirasMixer):
    config_cls = MemoraConfig
    op = staticmethod(memora)


register(
    MechanismSpec(
        key="memora",
        family="linear",
        config_cls=MemoraConfig,
        module_cls=Memora,
        op=memora,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="It's All Connected: Test-Time Memorization, Attentional Bias, Retention (Behrouz et al., 2025)",
        notes="matrix memory, rows softmax-normalised (KL retention), l2 bias, chunk-start gradients (chunk 16)",
        # as moneta: decoding equals the parallel form only at chunk 1
        extra={"test_options": {"chunk_size": 1}},
    )
)
