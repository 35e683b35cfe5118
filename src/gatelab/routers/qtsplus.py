"""QTSplus: a query-aware token selector between a token stream and a model (QTSplus, official code
Siyou-Li/QTSplus @5cc24bc, ``src/model/qts_plus_tokenizer/qts_plus.py``).

    selector = QTSplus(QTSplusConfig(d_model=256))
    out = selector(x, query)   # x (B, N, d) the stream, query (B, M, d) -> out.tokens (B, n, d), out.mask

As the official code:
- scoring: one cross-attention layer (fp32 RMSNorm pre-norm, no RoPE), q from the query, k from the stream;
  r = max over heads and query positions of the attention, (B, N) in [0, 1];
- budget: rho = rho_min + (rho_max - rho_min) * sigmoid(MLP([mean_M query, log N, max r, entropy(r / sum r)]))
  (MLP d + 3 -> 256 -> 1, GELU); n = min(ceil(rho N), n_max), at least 1;
- training: a threshold t from Newton steps (from the median) such that sum sigmoid((r - t) / tau) = rho N,
  then keep / drop by a hard straight-through Gumbel-softmax over [r - t, 0] at tau (the kept count is
  stochastic; at least one token is kept); kept tokens are scaled by their keep value (so the gate gets a
  gradient) and gathered in stream order;
- inference: a hard gate, the top-n of r, in stream order;
- a re-encoder: one pre-norm self-attention + MLP block over the kept tokens;
- auxiliary losses (``aux``): flops (rho N)^2 / n_max^2, kv rho N / n_max, smooth (rho - running mean)^2,
  weighted 1.0, 1.7, 0.05.

Where it differs: the official code pads a batch by repeating the last kept token, without a key mask, so a
short sample attends to duplicates and its output depends on the batch; here the padding is zeros with a
``mask`` (B, n) that the re-encoder uses as its key mask, so each sample's output is its own. The threshold is
found on detached scores (rho gets its gradient from the auxiliary losses, r from the keep gate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.mixers._base import check_fields, check_positive
from gatelab.registry import MechanismSpec, register


@dataclass
class QTSplusConfig:
    d_model: int = 256
    n_heads: int = 4
    rho_min: float = 0.05  # the retention budget rho lies in [rho_min, rho_max]
    rho_max: float = 0.5
    n_max: int = 2560  # the most tokens kept
    tau: float = 0.1  # temperature of the threshold's sigmoid and of the keep gate's Gumbel-softmax
    newton_steps: int = 10
    budget_hidden: int = 256
    reencode: bool = True  # one self-attention block over the kept tokens
    loss_weights: tuple = (1.0, 1.7, 0.05)  # flops, kv, smooth
    momentum: float = 0.9  # of the running mean of rho (the smooth loss)

    def __post_init__(self):
        check_fields(self)
        for name in ("d_model", "n_heads", "n_max", "newton_steps", "budget_hidden"):
            check_positive(f"qtsplus: {name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"qtsplus: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0 < self.rho_min <= self.rho_max <= 1:
            raise ValueError(f"qtsplus: the budget needs 0 < rho_min <= rho_max <= 1, got rho_min="
                             f"{self.rho_min!r}, rho_max={self.rho_max!r}")  # fmt: skip
        if self.tau <= 0:
            raise ValueError(f"qtsplus: tau must be > 0, got {self.tau!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"qtsplus: momentum must be in [0, 1), got {self.momentum!r}")
        if len(self.loss_weights) != 3 or any(w < 0 for w in self.loss_weights):
            raise ValueError(f"qtsplus: loss_weights must be three numbers >= 0, got {self.loss_weights!r}")


@dataclass
class QTSplusOutput:
    tokens: torch.Tensor  # (B, n, d) kept tokens in stream order, zero-padded to the batch's largest n
    mask: torch.Tensor  # (B, n) bool: True where a kept token sits
    indices: torch.Tensor  # (B, n) long: each kept token's position in the stream (-1 on padding)
    keep: torch.Tensor  # (B, N): the hard keep gate (its straight-through gradient in training)
    scores: torch.Tensor  # r (B, N)
    rho: torch.Tensor  # (B,) predicted retention budget
    n: torch.Tensor  # (B,) long: tokens the budget asks for (inference keeps exactly these)
    aux: dict  # "flops", "kv", "smooth": scalar tensors, already weighted


class CrossAttention(nn.Module):
    """Pre-norm (fp32 RMSNorm) multi-head attention of ``query`` (B, M, d) over ``x`` (B, N, d), no RoPE."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_norm, self.kv_norm = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.q_proj, self.k_proj = (
            nn.Linear(d_model, d_model, bias=False),
            nn.Linear(d_model, d_model, bias=False),
        )
        self.v_proj, self.o_proj = (
            nn.Linear(d_model, d_model, bias=False),
            nn.Linear(d_model, d_model, bias=False),
        )

    def _heads(self, t):  # (B, L, d) -> (B, h, L, d / h)
        return t.view(t.shape[0], t.shape[1], self.n_heads, -1).transpose(1, 2)

    def scores(self, x, query, key_mask=None) -> torch.Tensor:
        """-> attention probabilities (B, h, M, N), fp32."""
        q = self._heads(self.q_proj(self.q_norm(query.float())))
        k = self._heads(self.k_proj(self.kv_norm(x.float())))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x, query, key_mask=None) -> torch.Tensor:
        """-> (B, M, d): the query attending to x (masked keys left out)."""
        probs = self.scores(x, query, key_mask)
        v = self._heads(self.v_proj(self.kv_norm(x.float())))
        o = (probs @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.o_proj(o).to(x.dtype)


class ReEncoder(nn.Module):
    """One pre-norm self-attention + MLP block over the kept tokens, padding masked out of the keys."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.attn = CrossAttention(d_model, n_heads)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, tokens, mask):
        h = tokens + self.attn(tokens, tokens, key_mask=mask)
        return (h + self.mlp(self.mlp_norm(h))) * mask[..., None]


def newton_threshold(r: torch.Tensor, target: torch.Tensor, tau: float, steps: int) -> torch.Tensor:
    """r (B, N), target (B,) -> t (B,) with sum_j sigmoid((r_j - t) / tau) ~= target (Newton from the
    median)."""
    t = r.median(dim=-1).values
    for _ in range(steps):
        s = torch.sigmoid((r - t[:, None]) / tau)
        f = s.sum(-1) - target
        slope = -(s * (1 - s)).sum(-1) / tau  # df/dt
        t = t - f / slope.clamp(max=-1e-12)
    return t


def gather_kept(x: torch.Tensor, keep: torch.Tensor, hard: torch.Tensor):
    """x (B, N, d), keep (B, N) gate values, hard (B, N) bool -> tokens (B, n, d) = keep * x of the kept
    positions in stream order, zero-padded; mask (B, n); indices (B, n) (-1 on padding)."""
    B, N, _ = x.shape
    counts = hard.sum(-1)
    n = int(counts.max())
    # stable sort of "not kept" puts the kept positions first, in stream order
    order = torch.sort((~hard).to(torch.int8), dim=-1, stable=True).indices[:, :n]  # (B, n)
    mask = torch.arange(n, device=x.device)[None, :] < counts[:, None]
    scaled = x * keep[..., None].to(x.dtype)
    tokens = scaled.gather(1, order[..., None].expand(B, n, x.shape[-1])) * mask[..., None]
    return tokens, mask, torch.where(mask, order, torch.full_like(order, -1))


class QTSplus(nn.Module):
    """Query-aware token selection: ``forward(x (B, N, d), query (B, M, d)) -> QTSplusOutput``."""

    def __init__(self, config: QTSplusConfig):
        super().__init__()
        if not isinstance(config, QTSplusConfig):
            raise TypeError(f"QTSplus takes a QTSplusConfig, got {type(config).__name__}")
        c = self.config = config
        self.scorer = CrossAttention(c.d_model, c.n_heads)
        self.budget = nn.Sequential(nn.Linear(c.d_model + 3, c.budget_hidden), nn.GELU(),
                                    nn.Linear(c.budget_hidden, 1))  # fmt: skip
        self.reencoder = ReEncoder(c.d_model, c.n_heads) if c.reencode else None
        self.register_buffer("rho_mean", torch.tensor(0.5 * (c.rho_min + c.rho_max)))

    def _check(self, x, query):
        d = self.config.d_model
        for name, t, shape in (("x", x, "(B, N, d_model)"), ("query", query, "(B, M, d_model)")):
            if (
                not isinstance(t, torch.Tensor)
                or t.ndim != 3
                or t.shape[-1] != d
                or not t.dtype.is_floating_point
            ):
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"qtsplus: {name} must be a float tensor {shape} with d_model={d}, got {got}"
                )
            if t.shape[1] == 0:
                raise ValueError(f"qtsplus: {name} must hold at least one token, got shape {tuple(t.shape)}")
        if x.shape[0] != query.shape[0]:
            raise ValueError(
                f"qtsplus: x and query must have the same batch, got {x.shape[0]} and {query.shape[0]}"
            )

    def predict_budget(self, query, r) -> torch.Tensor:
        """query (B, M, d), r (B, N) -> rho (B,) in [rho_min, rho_max]."""
        c = self.config
        p = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        log_n = torch.full_like(entropy, math.log(r.shape[-1]))
        features = torch.cat(
            [query.float().mean(1), log_n[:, None], r.max(-1).values[:, None], entropy[:, None]], -1
        )
        return c.rho_min + (c.rho_max - c.rho_min) * torch.sigmoid(self.budget(features)).squeeze(-1)

    def forward(self, x: torch.Tensor, query: torch.Tensor, generator=None) -> QTSplusOutput:
        self._check(x, query)
        c = self.config
        B, N, _ = x.shape
        r = self.scorer.scores(x, query).amax(dim=(1, 2))  # (B, N) in [0, 1]
        rho = self.predict_budget(query, r)
        n = torch.clamp(torch.ceil(rho.detach() * N).long(), 1, min(c.n_max, N))
        if self.training:
            with torch.no_grad():
                t = newton_threshold(r.detach(), rho.detach() * N, c.tau, c.newton_steps)
            logits = torch.stack([r - t[:, None], torch.zeros_like(r)], dim=-1)  # (B, N, 2): [keep, drop]
            u = torch.rand(logits.shape, generator=generator, device=x.device).clamp(1e-10, 1 - 1e-7)
            soft = F.softmax((logits - torch.log(-torch.log(u))) / c.tau, dim=-1)[..., 0]
            hard = soft > 0.5
            best = F.one_hot(r.argmax(-1), N).bool()
            hard = hard | (best & ~hard.any(-1, keepdim=True))  # at least one token
            keep = hard.float() - soft.detach() + soft
        else:
            top = r.topk(int(n.max()), dim=-1).indices  # (B, n_max in batch), rank order
            ranks = torch.arange(top.shape[1], device=x.device)[None, :]
            hard = torch.zeros(B, N, dtype=torch.bool, device=x.device)
            hard.scatter_(1, top, ranks < n[:, None])
            keep = hard.float()
        tokens, mask, indices = gather_kept(x, keep, hard)
        if self.reencoder is not None:
            tokens = self.reencoder(tokens, mask)
        kept = rho * N
        w = c.loss_weights
        aux = {"flops": w[0] * (kept / c.n_max).square().mean(), "kv": w[1] * (kept / c.n_max).mean(),
               "smooth": w[2] * (rho - self.rho_mean).square().mean()}  # fmt: skip
        if self.training:
            with torch.no_grad():
                self.rho_mean.mul_(c.momentum).add_((1 - c.momentum) * rho.mean())
        return QTSplusOutput(tokens, mask, indices, keep, r, rho, n, aux)


register(
    MechanismSpec(
        key="qtsplus",
        family="gate",
        config_cls=QTSplusConfig,
        module_cls=QTSplus,
        paper="QTSplus: query-aware token selection (official code; no paper text read)",
        status="experimental",  # a module on (B, N, d) streams, not run in the lab
        causal=False,
        bidirectional=False,
        notes="a token selector on a (B, N, d) stream with a (B, M, d) query; not a sequence mixer",
        extra={"role": "token_selector"},
    )
)
