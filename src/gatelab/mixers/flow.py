"""Flow-Attention layer (Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)):
q, k, v projections, ``ops.flow`` (competition and allocation are its gates), output projection."""

from __future__ import annotations

from dataclasses import dataclass

from gatelab.ops.common.checks import check_choice
from gatelab.ops.flow import BACKENDS, flow, flow_attention_matrix
from gatelab.registry import MechanismSpec, register

from ._base import HeadDimConfig, check_positive
from ._linear import QKVLinearMixer, RecurrentState


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

    def _forward(self, x, state, return_internals):
        c = self.config
        B, T, _ = x.shape
        H, D = c.n_heads, c.dim
        initial_state, start = self.carried(state)
        q, k, v = self.project_qkv(x)  # (B, T, H, D)
        o, final = flow(
            q,
            k,
            v,
            causal=c.causal,
            eps=c.eps,
            chunk_size=c.chunk_size,
            initial_state=initial_state,
            output_final_state=c.causal,
            backend=c.backend,
        )  # (B, T, H, D)
        y = self.o_proj(o.reshape(B, T, H * D))
        new_state = RecurrentState(final, start + T) if c.causal else None
        internals = {}
        if return_internals and state is None:  # the T x T view of this call (no carried past)
            P, allocation, competition = flow_attention_matrix(
                q.detach(), k.detach(), causal=c.causal, eps=c.eps
            )
            internals = {"attn": P, "gate": allocation, "competition": competition}  # gates (B, T, H)
        return y, new_state, internals


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
