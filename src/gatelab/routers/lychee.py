"""LycheeDecode: hybrid-head decoding in which a few retrieval heads attend fully and select the top-k tokens,
and the other (sparse) heads attend only to those tokens; the head partition is learnt with a HardKuma gate
per KV head (LycheeDecode, arXiv 2602.04541, ICLR 2026). The official code could not be read; the method
follows a note read from the full paper and a port's defaults (/work/shared/research/seeds2.md section 3).

One layer of it, as a mixer. The paper passes a retrieval head's selection to the same head index of the
next layer; a mixer is one layer, so here the selection is made in the layer itself: the mean of the
retrieval heads' attention maps (per query) picks the ``budget`` tokens every sparse head of the layer
attends to. In training every head computes both maps and mixes them by its gate, A = z A_full +
(1 - z) A_sparse, z ~ HardKuma(alpha, beta) stretched to (low, high) and clipped to [0, 1]; the selection is
then the z-weighted mean of the heads' maps. In eval a head retrieves iff E[z] > 0.5 (at most
``max_retrieval_heads``, by E[z]); if none does, the head with the largest E[z] retrieves (the sparse heads
need a selector). The budget loss is the port's Lagrangian on the expected L0 norm with its multiplicative
multiplier update (:func:`lychee_l0_loss`; the trainer adds it to the loss of a model that has these layers).
Decoding selects per query from the full cache, so it equals the parallel pass; the cache keeps every token
(the method saves reads of the cache, not its size). On CPU both maps are dense; ``flops_per_token`` counts
what a sparse kernel would do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.mixers._attention import AttentionConfig, AttentionMixer
from gatelab.mixers._base import check_choice, check_positive, check_probability
from gatelab.ops.common.masks import attention_mask
from gatelab.ops.softmax import apply_probs, attention_probs
from gatelab.registry import MechanismSpec, register

from ._common import route_record

QUADRATURE = 512  # midpoints in u for E[z] (z is a monotone function of u ~ U(0, 1))


def hardkuma_sample(log_alpha, log_beta, low: float, high: float, u: torch.Tensor) -> torch.Tensor:
    """z = clamp(low + (high - low) (1 - u^(1/beta))^(1/alpha), 0, 1) for u in (0, 1), broadcast over the
    gates (the Kumaraswamy inverse CDF, stretched and rectified, as in "Interpretable Neural Predictions with
    Differentiable Binary Variables", 2019)."""
    alpha, beta = log_alpha.exp(), log_beta.exp()
    s = (1 - u.pow(1 / beta)).clamp_min(1e-12).pow(1 / alpha)
    return (low + (high - low) * s).clamp(0, 1)


def hardkuma_l0(log_alpha, log_beta, low: float, high: float) -> torch.Tensor:
    """P(z != 0) = 1 - F(-low / (high - low)) with the Kumaraswamy CDF F(x) = 1 - (1 - x^alpha)^beta."""
    x0 = -low / (high - low)
    return (1 - x0 ** log_alpha.exp()).pow(log_beta.exp())


@dataclass
class LycheeConfig(AttentionConfig):
    budget: int = 64  # tokens each sparse head attends to (the top-k of the retrieval heads' maps)
    kuma_low: float = -0.1  # HardKuma stretch (the usual choice; the paper's own is not verified)
    kuma_high: float = 1.1
    target_density: float = 0.08333  # expected fraction of retrieval heads the L0 Lagrangian aims at (port)
    l0_lambda: float = 2.0  # initial Lagrange multiplier (port)
    l0_lr: float = 0.001  # multiplicative update lambda <- lambda exp(l0_lr * violation) (port)
    max_retrieval_heads: int | None = None  # eval: at most this many retrieval KV heads
    route: str = "learned"  # "retrieval" / "sparse": every head forced to one side (tests, ablations)

    def __post_init__(self):
        super().__post_init__()
        check_positive("budget", self.budget)
        check_positive("max_retrieval_heads", self.max_retrieval_heads, allow_none=True)
        check_choice("route", self.route, ("learned", "retrieval", "sparse"))
        check_choice("backend", self.backend, ("auto", "reference"))  # both maps are dense fp32 here
        if not (self.kuma_low < 0 and self.kuma_high > 1):
            raise ValueError(f"need kuma_low < 0 and kuma_high > 1, got {self.kuma_low}, {self.kuma_high}")
        check_probability("target_density", self.target_density, low_open=False, high_open=False)
        if self.l0_lambda <= 0 or self.l0_lr < 0:
            raise ValueError(f"need l0_lambda > 0 and l0_lr >= 0, got {self.l0_lambda}, {self.l0_lr}")
        if self.max_retrieval_heads is not None and self.max_retrieval_heads > self.kv_heads:
            raise ValueError(
                f"max_retrieval_heads must be <= the {self.kv_heads} KV heads, got {self.max_retrieval_heads}"
            )
        if not self.causal:
            raise ValueError("lychee is a decoding method: causal=False is not supported")


class LycheeDecode(AttentionMixer):
    """x (B, T, d_model) -> y (B, T, d_model); state: the plain KV cache (every token).

    internals: "attn" (B, H, T, S) the mixed map each head applied, "gate" (Hkv,) z, "selected" (B, T, S)
    the sparse heads' tokens, "route" the fraction of KV heads that retrieve (unit "heads")."""

    config_cls = LycheeConfig
    accepts_cache_policy = False  # its sparse heads' token selection is its own; see gatelab.cache.lychee

    def __init__(self, config: LycheeConfig):
        super().__init__(config)
        self.log_alpha = nn.Parameter(torch.zeros(config.kv_heads))  # alpha = beta = 1 at start
        self.log_beta = nn.Parameter(torch.zeros(config.kv_heads))
        self.register_buffer("l0_multiplier", torch.tensor(config.l0_lambda), persistent=True)
        self.last_fraction: torch.Tensor | None = None

    def expected_gate(self) -> torch.Tensor:
        """E[z] (Hkv,) by the midpoint rule in u."""
        c = self.config
        u = (torch.arange(QUADRATURE, device=self.log_alpha.device) + 0.5) / QUADRATURE
        z = hardkuma_sample(self.log_alpha[:, None], self.log_beta[:, None], c.kuma_low, c.kuma_high, u)
        return z.mean(-1)

    def expected_l0(self) -> torch.Tensor:
        """E[||z||_0] / Hkv: the expected fraction of retrieval KV heads, differentiable in alpha and beta."""
        c = self.config
        return hardkuma_l0(self.log_alpha, self.log_beta, c.kuma_low, c.kuma_high).mean()

    def retrieval(self) -> torch.Tensor:
        """Eval partition (Hkv,) bool: E[z] > 0.5, at most max_retrieval_heads (largest E[z]), at least one."""
        c = self.config
        if c.route != "learned":
            return torch.full((c.kv_heads,), c.route == "retrieval", device=self.log_alpha.device)
        mean = self.expected_gate().detach()
        chosen = mean > 0.5
        limit = c.max_retrieval_heads or c.kv_heads
        rank = torch.argsort(mean, descending=True, stable=True)
        allowed = torch.zeros_like(chosen).scatter(0, rank[:limit], True)
        chosen &= allowed
        if not chosen.any():
            chosen[rank[0]] = True
        return chosen

    def gate(self) -> torch.Tensor:
        """z (Hkv,): a HardKuma sample in training, the hard partition in eval (and when routes are forced)."""
        c = self.config
        if not self.training or c.route != "learned":
            return self.retrieval().float()
        u = torch.rand(c.kv_heads, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        return hardkuma_sample(self.log_alpha, self.log_beta, c.kuma_low, c.kuma_high, u)

    def attend(self, q, k, v, x, extra, want_internals):
        c = self.config
        H, Hkv, Tq, S = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
        p = attention_probs(q, k, causal=True)  # (B, H, Tq, S) fp32
        z = self.gate()  # (Hkv,)
        zq = z.repeat_interleave(H // Hkv)  # (H,) a KV head's gate for each of its query heads
        chooser = zq.detach() if bool(zq.detach().sum() > 0) else torch.ones_like(zq)
        score = torch.einsum("bhts,h->bts", p.detach(), chooser / chooser.sum())  # (B, Tq, S)
        visible = attention_mask(Tq, S, causal=True, device=q.device)  # (Tq, S)
        score = score.masked_fill(~visible, float("-inf"))
        top = score.topk(min(c.budget, S), dim=-1).indices
        selected = torch.zeros_like(score, dtype=torch.bool).scatter(-1, top, True) & visible  # (B, Tq, S)
        sparse = p * selected[:, None]
        sparse = sparse / sparse.sum(-1, keepdim=True)  # softmax over the selected keys alone
        mixed = zq[:, None, None] * p + (1 - zq[:, None, None]) * sparse  # the paper's z A_r + (1 - z) A_s
        o = apply_probs(mixed, v, H).to(q.dtype)
        fraction = z.detach().mean()
        self.last_fraction = fraction
        if not want_internals:
            return o, {}
        return o, {"attn": mixed, "gate": z.detach(), "selected": selected,
                   "route": route_record(fraction, "heads")}  # fmt: skip

    def l0_loss(self) -> torch.Tensor:
        """lambda (E[L0] - target); in training each call also updates lambda <- clamp(lambda exp(l0_lr
        (E[L0] - target)), 1e-12, 20), the port's multiplicative rule."""
        c = self.config
        violation = self.expected_l0() - c.target_density
        if self.training:
            with torch.no_grad():
                self.l0_multiplier.mul_(torch.exp(c.l0_lr * violation.detach())).clamp_(1e-12, 20.0)
        return self.l0_multiplier * violation

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at ``seq_len`` (a multiply-add counts 2), from the last call's retrieval
        fraction f (of KV heads; 1 before any call): projections 2 d D (H + 2 Hkv) + 2 H D d; a retrieval head
        4 D n with n = (L + 1) / 2 keys on average, a sparse head 4 D min(budget, n); the selection adds n per
        retrieval head (summing the maps)."""
        check_positive("seq_len", seq_len)
        c = self.config
        d, H, Hkv, D = c.d_model, c.n_heads, c.kv_heads, c.dim
        f = 1.0 if self.last_fraction is None else float(self.last_fraction)
        n = (seq_len + 1) / 2
        projections = 2 * d * D * (H + 2 * Hkv) + 2 * H * D * d
        attention = H * (f * 4 * D * n + (1 - f) * 4 * D * min(c.budget, n) + f * n)
        return float(projections + attention)


def lychee_layers(model: nn.Module) -> list[LycheeDecode]:
    return [m for m in model.modules() if isinstance(m, LycheeDecode)]


def lychee_l0_loss(model: nn.Module):
    """Sum of the LycheeDecode layers' L0 Lagrangian terms (0 without such layers): the trainer's extra loss."""
    return sum((layer.l0_loss() for layer in lychee_layers(model)), 0.0)


register(
    MechanismSpec(
        key="lychee",
        family="router",
        config_cls=LycheeConfig,
        module_cls=LycheeDecode,
        op=None,
        backends=("reference",),
        causal=True,
        bidirectional=False,
        paper="LycheeDecode: hybrid-head sparse decoding with HardKuma-learnt retrieval heads "
        "(arXiv 2602.04541, ICLR 2026)",
        notes="retrieval heads pick the top-k tokens the sparse heads attend to; heads by a HardKuma gate",
        extra={"test_options": {"budget": 4}},
    )
)
