"""What the Miras mixers share (It's All Connected, Behrouz et al., 2025): the layer the paper describes,
q/k/v projections, short causal convolutions, L2-normalised q and k, the memory, a normalised and gated
output, which is Gated DeltaNet's layer with the delta rule replaced by the Miras memory. The retention
alpha_t = exp(g_t) keeps Gated DeltaNet's Mamba2-style decay and the learning rate eta_t = sigmoid(x W_b) its
write strength: per-head scalars, where the paper uses low-rank channel-wise projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.common.checks import check_choice

from ._base import check_positive
from ._linear import OpInputs
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig


@dataclass
class MirasConfig(GatedDeltaNetConfig):
    chunk_size: int = 16  # the paper trains with chunks of 16 or 64; gradients at each chunk's start
    memory: str = "matrix"  # or "mlp": the paper's x + LN(W1 gelu(W2 x)) per head (needs expand_v = 1)
    mlp_expand: int = 4  # hidden width E = mlp_expand * K of the MLP memory
    # largest learning rate, eta = eta_max sigmoid(x W_b); None: 1 for the matrix memory (the delta rule's
    # beta range) and 0.1 for the MLP memory, whose steps through LN and GELU amplify with eta near 1 (a
    # perturbation of 1e-9 grew to 1e-3 over 13 tokens at init with Yaad)
    eta_max: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_choice("memory", self.memory, ("matrix", "mlp"))
        check_positive("mlp_expand", self.mlp_expand)
        if self.eta_max is not None and not 0 < self.eta_max <= 1:
            raise ValueError(f"eta_max must lie in (0, 1], got {self.eta_max!r}")
        if self.memory == "mlp" and self.value_dim != self.key_dim:
            raise ValueError(
                f"memory='mlp' needs value_dim = key_dim (expand_v=1: the memory's residual maps a key to a "
                f"value of its width), got key_dim={self.key_dim}, value_dim={self.value_dim}"
            )

    @property
    def learning_rate_max(self) -> float:
        if self.eta_max is not None:
            return self.eta_max
        return 1.0 if self.memory == "matrix" else 0.1


class MirasMixer(GatedDeltaNet):
    """x (B, T, d_model) -> y (B, T, d_model); state: RecurrentState with the unnormalised memory A
    (B, H, K, V) fp32 (memory="mlp": the pair (W1 (B, H, V, E), W2 (B, H, E, K)), starting from the learnt
    ``memory_w1``, ``memory_w2``) and the short-convolution inputs, as Gated DeltaNet's.

    internals: "gate" alpha = exp(g) and "eta" (B, T, H). There is no "attn": the memory is not linear in
    the values. Subclasses add ``op_options`` and ``extra_gates``."""

    config_cls = MirasConfig

    def __init__(self, config: MirasConfig):
        super().__init__(config)
        if config.memory == "mlp":  # the memory every sequence starts from, learnt (as Titans' memory)
            H, K = config.n_heads, config.key_dim
            E = config.mlp_expand * K
            self.memory_w1 = nn.Parameter(torch.randn(H, K, E) / math.sqrt(E))  # (H, V, E), V = K
            self.memory_w2 = nn.Parameter(torch.randn(H, E, K) / math.sqrt(K))  # (H, E, K)

    def carried(self, state, batch):
        initial, start, conv = super().carried(state, batch)
        if initial is None and self.config.memory == "mlp":
            initial = tuple(w.float().expand(batch, *w.shape) for w in (self.memory_w1, self.memory_w2))
        return initial, start, conv

    def op_options(self) -> dict:
        """Keyword options of the op (the loss and normalisation powers)."""
        return {}

    def extra_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """More (B, T, H) per-token terms the op takes after eta (Yaad's threshold)."""
        return ()

    def features(self, x, start, conv):
        inputs = super().features(x, start, conv)  # q, k, v, g, beta (the learning rate eta)
        q, k, v, g, beta = inputs.args
        args = (q, k, v, g, beta * self.config.learning_rate_max)
        options = {**self.op_options(), "memory": self.config.memory}
        return OpInputs(args + self.extra_gates(x), options=options, conv=inputs.conv)

    def internals(self, inputs, state):
        g, eta = inputs.args[3], inputs.args[4]
        return {"gate": g.detach().exp(), "eta": eta.detach()}
