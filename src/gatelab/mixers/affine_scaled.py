"""Affine-scaled attention: each query's softmax weights rescaled by alpha(x) and shifted by
beta(x) = (alpha_ma - alpha(x)) / N, so they sum to a running mean of alpha rather than to 1
(Affine-Scaled Attention, Bae et al., 2026, Eqs. 6-9 and 11)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.affine_scaled import BACKENDS, affine_scaled, affine_scaled_weights
from gatelab.registry import MechanismSpec, register

from ._attention import AttentionConfig, AttentionMixer


def linear_clipping(x: torch.Tensor) -> torch.Tensor:
    """The paper's phi (Eq. 11): clip(0.1 x + 0.5, 0, 1), 0 for x <= -5 and 1 for x >= 5."""
    return (0.1 * x + 0.5).clamp(0.0, 1.0)


@dataclass
class AffineScaledConfig(AttentionConfig):
    ema_momentum: float = 0.9  # rho of Eq. 9: alpha_ma <- rho alpha_ma + (1 - rho) E_batch[alpha]

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1), got {self.ema_momentum!r}")


class AffineScaledAttention(AttentionMixer):
    """Softmax attention with O = (alpha softmax(Q K^T / sqrt(d)) + beta) V.

    alpha = phi(x W_a) is one value per query token and head (Eq. 7); beta = (alpha_ma - alpha) / N with N
    the number of keys the query sees (Eq. 8; for causal queries the visible prefix, so beta never reaches
    a future key: the paper does not say, and any other N would leak); alpha_ma (H,) is an exponential
    moving average of the batch mean of alpha per head (Eq. 9; the paper does not say per head or per
    layer, per head matches alpha's shape), starting at 0 and updated in train mode only.

    internals: "alpha", "beta" (B, T, H) and "attn", the affine weights (B, H, T, S) (rows sum to alpha_ma).
    """

    config_cls = AffineScaledConfig

    def __init__(self, config: AffineScaledConfig):
        super().__init__(config)
        self.alpha_proj = nn.Linear(config.d_model, config.n_heads, bias=False)  # W_a in R^{d x H}
        self.register_buffer("alpha_ma", torch.zeros(config.n_heads))  # Eq. 9: alpha_ma,0 = 0

    def affine_terms(self, x: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) of the queries, S = n_keys keys -> alpha, beta (B, T, H) fp32."""
        T = x.shape[1]
        alpha = linear_clipping(self.alpha_proj(x).float())  # (B, T, H)
        if self.training:
            with torch.no_grad():
                rho = self.config.ema_momentum
                self.alpha_ma.mul_(rho).add_((1 - rho) * alpha.mean(dim=(0, 1)))
        if self.config.causal:  # query t (bottom-right aligned) sees S - T + t + 1 keys
            visible = torch.arange(n_keys - T + 1, n_keys + 1, device=x.device, dtype=torch.float32)
        else:
            visible = torch.full((T,), float(n_keys), device=x.device)
        beta = (self.alpha_ma.float() - alpha) / visible[:, None]  # (B, T, H)
        return alpha, beta

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        alpha, beta = self.affine_terms(x, k.shape[1])
        o = affine_scaled(q, k, v, alpha, beta, causal=c.causal, backend=c.backend)
        if not want_internals:
            return o, {}
        with torch.no_grad():
            weights = affine_scaled_weights(q, k, alpha, beta, causal=c.causal)
        return o, {"alpha": alpha.detach(), "beta": beta.detach(), "attn": weights}

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        nn.init.normal_(self.alpha_proj.weight, std=std)


register(
    MechanismSpec(
        key="affine_scaled",
        family="softmax",
        config_cls=AffineScaledConfig,
        module_cls=AffineScaledAttention,
        op=affine_scaled,
        backends=BACKENDS,
        causal=True,
        bidirectional=True,
        paper="Affine-Scaled Attention (Bae et al., 2026)",
        notes="alpha = clip(0.1 x W_a + 0.5, 0, 1) per query and head; beta = (EMA(alpha) - alpha) / visible keys",
    )
)
