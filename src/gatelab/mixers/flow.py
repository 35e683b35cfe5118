"""Flow-Attention layer (Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)):
q, k, v projections, ``ops.flow`` (competition and allocation are its gates), output projection."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.common.checks import check_choice
from gatelab.ops.flow import BACKENDS, flow, flow_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import HeadDimConfig, check_positive
from ._linear import OpInputs, QKVLinearMixer


@dataclass
class FlowConfig(HeadDimConfig):
    eps: float = 1e-6
    chunk_size: int = 64
    bias: bool = True  # the official layer's projections have biases

    def __post_init__(self):
        super().__post_init__()
        check_positive("chunk_size", self.chunk_size)
        check_choice("backend", self.backend, ("auto", *BACKENDS))
        if not isinstance(self.eps, int | float) or self.eps < 0:
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")


class FlowAttention(QKVLinearMixer):
    """state = RecurrentState holding a FlowState (tuple of running sums) when causal."""

    config_cls = FlowConfig
    op = staticmethod(flow)

    def features(self, x, start, conv):
        return OpInputs(self.project_qkv(x), {"causal": self.config.causal, "eps": self.config.eps})

    def internals(self, inputs, state):
        if state is not None:  # the T x T view covers this call only: with a carried past there is none
            return {}
        q, k, _ = inputs.args
        P, allocation, competition = flow_attention_matrix(
            q.detach(), k.detach(), causal=self.config.causal, eps=self.config.eps
        )
        return {"attn": P, "gate": allocation, "competition": competition}  # gates (B, T, H)


register(
    MechanismSpec(
        key="flow",
        family="linear",
        config_cls=FlowConfig,
        module_cls=FlowAttention,
        op=flow,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)",
    )
)
