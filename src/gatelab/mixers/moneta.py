"""Moneta layer: the Miras memory with an l_p attentional bias and l_q normalisation (It's All Connected:
A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online Optimization, Behrouz
et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.moneta import BACKENDS, moneta
from gatelab.registry import MechanismSpec, register

from ._miras import MirasConfig, MirasMixer


@dataclass
class MonetaConfig(MirasConfig):
    bias_power: float = 3.0  # p of the l_p attentional bias (the paper's Moneta: 3)
    norm_power: float = 4.0  # q of the l_q normalisation (the paper's Moneta: 4)
    norm_floor: float = 1.0  # the l_q norm is floored here (no blow-up of a near-zero memory)

    def __post_init__(self):
        super().__post_init__()
        for name in ("bias_power", "norm_power"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)!r}")
        if self.norm_floor <= 0:
            raise ValueError(f"norm_floor must be > 0, got {self.norm_floor!r}")


class Moneta(MirasMixer):
    config_cls = MonetaConfig
    op = staticmethod(moneta)

    def op_options(self):
        c = self.config
        return {"bias_power": c.bias_power, "norm_power": c.norm_power, "norm_floor": c.norm_floor}


register(
    MechanismSpec(
        key="moneta",
        family="linear",
        config_cls=MonetaConfig,
        module_cls=Moneta,
        op=moneta,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="It's All Connected: Test-Time Memorization, Attentional Bias, Retention (Behrouz et al., 2025)",
        notes="matrix memory, l_p bias (p=3), l_q normalised (q=4), chunk-start gradients (chunk 16)",
        # chunks > 1 take every gradient at the chunk start by design, so decoding (one-token steps)
        # equals the parallel form only at chunk 1: the shared driver runs that
        extra={"test_options": {"chunk_size": 1}},
    )
)
