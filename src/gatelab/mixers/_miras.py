"""What the Miras mixers share (It's All Connected, Behrouz et al., 2025): the layer the paper describes,
q/k/v projections, short causal convolutions, L2-normalised q and k, the memory, a normalised and gated
output, which is Gated DeltaNet's layer with the delta rule replaced by the Miras memory. The retention
alpha_t = exp(g_t) keeps Gated DeltaNet's Mamba2-style decay and the learning rate eta_t = sigmoid(x W_b) its
write strength: per-head scalars, where the paper uses low-rank channel-wise projections."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._linear import OpInputs
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig


@dataclass
class MirasConfig(GatedDeltaNetConfig):
    chunk_size: int = 16  # the paper trains with chunks of 16 or 64; gradients at each chunk's start


class MirasMixer(GatedDeltaNet):
    """x (B, T, d_model) -> y (B, T, d_model); state: RecurrentState with the unnormalised memory A
    (B, H, K, V) fp32 and the short-convolution inputs, as Gated DeltaNet's.

    internals: "gate" alpha = exp(g) and "eta" (B, T, H). There is no "attn": the memory is not linear in
    the values. Subclasses add ``op_options`` and ``extra_gates``."""

    config_cls = MirasConfig

    def op_options(self) -> dict:
        """Keyword options of the op (the loss and normalisation powers)."""
        return {}

    def extra_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """More (B, T, H) per-token terms the op takes after eta (Yaad's threshold)."""
        return ()

    def features(self, x, start, conv):
        inputs = super().features(x, start, conv)  # q, k, v, g, beta (the learning rate eta)
        return OpInputs(inputs.args + self.extra_gates(x), options=self.op_options(), conv=inputs.conv)

    def internals(self, inputs, state):
        g, eta = inputs.args[3], inputs.args[4]
        return {"gate": g.detach().exp(), "eta": eta.detach()}
