"""Flux Attention: a per-layer router between full and sparse attention (Flux Attention, arXiv 2604.07394;
official code qqtang-code/FluxAttention @031f22f, ``fluxattn/training/modeling_flash_qwen.py``).

One attention layer (the projections, QK-norm, RoPE and KV cache of softmax attention) with a small router
that reads the layer's queries once per sequence and picks z = 1 (full softmax attention) or z = 0 (a sparse
mechanism of gatelab: ``sliding_window`` (the paper's default "streaming": sinks + local window), ``hip`` or
``psa``) for the whole sequence, every head alike: ``o = z * full(q, k, v) + (1 - z) * sparse(q, k, v)``.

As the official code:
- router input: q after QK-norm, before RoPE, (B, T, H, D); pooled as the mean of the first and the last
  ``pool_size`` positions of the prefill (all positions when it is shorter than 2 * pool_size), then the mean
  over heads -> (B, D);
- router MLP D -> 8D -> 2D -> 4D -> D -> 2 with SiLU; the last layer zero with bias [0, 4.5], so training
  starts on full attention;
- training: hard straight-through Gumbel-softmax over the two logits at temperature tau, a cosine from
  1.5 to 1.0 over the first ``anneal_steps`` training calls (the paper: 60% of the steps), 1.0 after;
  inference: argmax; both branches run in training so z gets a gradient (full - sparse);
- the route is decided at prefill and kept in decoding (the state carries it).
- the sparsity budget is :func:`budget_loss` (the paper's lambda1 |s - t| + lambda2 (s - t)^2 with s the
  per-sequence fraction of layers on the sparse side); the paper trains the lambdas by dual ascent, whose
  gradients are never negative (both only grow); here they are fixed weights (``FluxConfig.budget_weights``).

Where it differs from a plain causal mixer: the route is a function of the whole prefill, so within one
prefill an early token's output depends on later tokens through one bit per layer; decoding reproduces the
parallel pass exactly only when both see the same route (the parallel pass routes from the whole sequence,
a prefill from its prefix). With a forced ``route`` ("full" / "sparse") the layer is exactly softmax / the
sparse mechanism, causal, and decode == parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.mixers._attention import AttentionConfig, AttentionMixer
from gatelab.mixers._base import check_positive
from gatelab.mixers._kv_cache import KVCache, KVCacheManager
from gatelab.ops.common.checks import check_choice
from gatelab.ops.softmax import BACKENDS, softmax
from gatelab.registry import MechanismSpec, get, register

from ._common import route_record, straight_through
from .flops import attention_flops, linear_flops

SPARSE = ("sliding_window", "hip", "psa")
ROUTES = ("learned", "full", "sparse")
TAU_START, TAU_END = 1.5, 1.0  # the official lh_trainer's cosine schedule
ROUTER_LR = 5e-4  # the official script's router learning rate
FULL_BIAS = 4.5  # the router's last-layer bias on "full": training starts at z = 1


@dataclass
class FluxConfig(AttentionConfig):
    sparse: str = "sliding_window"  # the sparse side: sliding_window, hip or psa
    window: int = 64  # sliding_window / hip: the local window (the paper: 1024 or 2048 tokens)
    sinks: int = 4  # sliding_window / hip: the first tokens always seen (the paper: one 128-token block)
    pool_size: int = 100  # the router pools the first and last pool_size queries (official default)
    route: str = "learned"  # "full" / "sparse" force every sequence to one side
    anneal_steps: int = 100  # training calls over which tau goes 1.5 -> 1.0 (the paper: 60% of the steps)
    budget_target: float = 0.45  # t: wanted fraction of layers on the sparse side (the paper's QA target)
    budget_weights: tuple = field(default=(0.25, 0.25))  # (lambda1, lambda2) of |s - t| and (s - t)^2

    def __post_init__(self):
        super().__post_init__()
        check_choice("sparse", self.sparse, SPARSE)
        check_choice("route", self.route, ROUTES)
        check_positive("window", self.window)
        check_positive("pool_size", self.pool_size)
        for name in ("sinks", "anneal_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"flux: {name} must be an int >= 0, got {value!r}")
        if not 0 <= self.budget_target <= 1:
            raise ValueError(f"flux: budget_target must be in [0, 1] (a fraction of layers), got "
                             f"{self.budget_target!r}")  # fmt: skip
        weights = tuple(self.budget_weights)
        if len(weights) != 2 or any(not isinstance(w, int | float) or isinstance(w, bool) or w < 0
                                    for w in weights):  # fmt: skip
            raise ValueError(f"flux: budget_weights must be two numbers >= 0 (lambda1, lambda2), got "
                             f"{self.budget_weights!r}")  # fmt: skip
        self.budget_weights = tuple(float(w) for w in weights)
        if not self.causal:
            raise ValueError("flux is a causal (decoder) mixer; causal=False is not supported")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}, got {self.backend!r}")

    def sparse_config(self):
        """The config of the sparse side: this layer's shape, window and sinks where it takes them."""
        config_cls = get(self.sparse).config_cls
        names = set(config_cls.__dataclass_fields__)
        shared = {
            k: v
            for k, v in self.to_dict().items()
            if k in names and k in AttentionConfig.__dataclass_fields__
        }
        shared["backend"] = "auto"  # the sparse op's own choice (flux's backend names the full side's)
        own = {k: getattr(self, k) for k in ("window", "sinks") if k in names}
        return config_cls(**shared, **own)


@dataclass
class FluxCache(KVCache):
    """The KV cache (every token: either side may be the one decoding) and the route of each sequence,
    z (B,) in {0, 1}, decided at prefill."""

    route: torch.Tensor = field(default=None, kw_only=True)

    def append(self, k, v) -> FluxCache:
        base = super().append(k, v)
        return FluxCache(base.k, base.v, base.length, signature=base.signature, route=self.route)


class FluxCacheManager(KVCacheManager):
    name = "flux"
    state_cls = FluxCache

    def update(self, mixer, state, q, k, v, x, positions):
        if state is None:
            cache = FluxCache(k, v, k.shape[1], signature=mixer.state_signature(k.shape[0]),
                              route=mixer._route.detach())  # fmt: skip
        else:
            cache = state.append(k, v)
        return cache, q, cache.k, cache.v


class Router(nn.Module):
    """Pooled queries (B, D) -> two logits (B, 2): [sparse, full]."""

    def __init__(self, dim: int):
        super().__init__()
        sizes = (dim, 8 * dim, 2 * dim, 4 * dim, dim)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.mlp[:-1]:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, FULL_BIAS]))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled.float())


def pool_queries(q: torch.Tensor, pool_size: int) -> torch.Tensor:
    """q (B, T, H, D) -> (B, D): the mean of the first and the last ``pool_size`` positions (every position
    when T <= 2 * pool_size), then over heads."""
    T = q.shape[1]
    span = q if T <= 2 * pool_size else torch.cat([q[:, :pool_size], q[:, -pool_size:]], dim=1)
    return span.float().mean(dim=(1, 2))


def tau_at(step: int, anneal_steps: int) -> float:
    """The Gumbel temperature after ``step`` training calls: cosine 1.5 -> 1.0 over anneal_steps, then 1.0."""
    if anneal_steps == 0 or step >= anneal_steps:
        return TAU_END
    return TAU_END + (TAU_START - TAU_END) * 0.5 * (1 + math.cos(math.pi * step / anneal_steps))


def straight_through_gumbel(logits: torch.Tensor, tau: float, generator=None) -> torch.Tensor:
    """logits (B, 2) -> z (B,): hard one-hot of argmax((logits + g) / tau) in the forward, the gradient of
    softmax((logits + g) / tau)[:, 1] in the backward (g: Gumbel noise)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-10, 1 - 1e-7)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return straight_through(hard, soft)[:, 1]


class FluxAttention(AttentionMixer):
    """Full or sparse attention per sequence, chosen by a router at prefill. Parameters: those of softmax
    attention (a softmax layer's state dict loads with ``strict=False``) plus ``router``."""

    config_cls = FluxConfig
    accepts_cache_policy = False  # its cache carries the route

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        sparse = get(config.sparse).module_cls(config.sparse_config())
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            sparse._modules.pop(name, None)  # only its ``attend`` runs, on this layer's q, k, v
        sparse._buffers.pop("inv_freq", None)
        self.sparse = sparse
        self.router = Router(config.dim)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.last_route: torch.Tensor | None = None  # z (B,) of the last call, with its gradient
        self.last_expensive_fraction: float | None = None  # mean z of the last call (flops_per_token)

    def own_cache(self) -> KVCacheManager:
        return FluxCacheManager()

    def decide(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D) of a prefill (after QK-norm, before RoPE) -> z (B,) in {0, 1} (float)."""
        c = self.config
        B = q.shape[0]
        if c.route != "learned":
            return q.new_full((B,), 1.0 if c.route == "full" else 0.0, dtype=torch.float32)
        logits = self.router(pool_queries(q, c.pool_size))  # (B, 2)
        if not self.training:
            return logits.argmax(dim=-1).float()
        tau = tau_at(int(self.steps_seen), c.anneal_steps)
        self.steps_seen += 1
        return straight_through_gumbel(logits, tau)

    def _forward(self, x, state, return_internals):
        self.__dict__["_state_route"] = None if state is None else getattr(state, "route", None)
        try:
            return super()._forward(x, state, return_internals)
        finally:
            self.__dict__.pop("_state_route", None)

    def split_query(self, q_out):
        q, _ = super().split_query(q_out)  # (B, T, H, D)
        route = self.__dict__.get("_state_route")
        if route is None:  # a prefill: route from this call's queries (QK-norm before RoPE, as the paper)
            route = self.decide(self.q_norm(q) if self.config.qk_norm else q)
        self.__dict__["_route"] = route
        return q, route

    def attend(self, q, k, v, x, z, want_internals: bool):
        """q (B, T, H, D), k/v (B, S, Hkv, D), z (B,) -> o (B, T, H, D); internals "route", "attn"."""
        c = self.config
        self.last_route = z
        self.last_expensive_fraction = float(z.detach().float().mean())
        all_full, all_sparse = bool((z == 1).all()), bool((z == 0).all())
        full = sparse = None
        full_probs = sparse_probs = None
        if not all_sparse or (self.training and c.route == "learned"):
            full = softmax(q, k, v, causal=True, backend=c.backend)
            full_probs = self.probs(q, k)["attn"] if want_internals else None
        if not all_full or (self.training and c.route == "learned"):
            sparse, internals = self.sparse.attend(q, k, v, x, None, want_internals)
            sparse_probs = internals.get("attn")
        if full is None:
            o, probs = sparse, sparse_probs
        elif sparse is None:
            o, probs = full, full_probs
        else:  # both run: z's straight-through gradient is (full - sparse)
            w = z.to(q.dtype)[:, None, None, None]
            o = w * full + (1 - w) * sparse
            probs = None if full_probs is None else w * full_probs + (1 - w) * sparse_probs
        if not want_internals:
            return o, {}
        return o, {"attn": probs, "route": {**route_record(z.float().mean(), "layers"), "z": z.detach()}}

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of this layer over a sequence of ``seq_len`` tokens, at the last measured
        route (full when none was measured): projections + z * full + (1 - z) * sparse attention + the
        router's one pass per sequence, spread over its tokens (gatelab.routers.flops)."""
        check_positive("seq_len", seq_len)
        c = self.config
        fraction = 1.0 if self.last_expensive_fraction is None else self.last_expensive_fraction
        projections = linear_flops(self, exclude=(self.router,))
        full = attention_flops("softmax", c, seq_len)
        sparse = attention_flops(c.sparse, self.sparse.config, seq_len)
        router = 0.0 if c.route != "learned" else linear_flops(self.router) / seq_len
        return projections + fraction * full + (1 - fraction) * sparse + router

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        self.router.reset_parameters()


def flux_layers(model: nn.Module) -> list[FluxAttention]:
    return [m for m in model.modules() if isinstance(m, FluxAttention)]


def router_groups(model: nn.Module, lr: float = ROUTER_LR) -> list[dict]:
    """The paper's fine-tuning on a frozen model as the trainer's parameter groups: the Flux routers only, at
    ``lr`` (official 5e-4), no weight decay; every other parameter stays out (frozen). Pass
    ``extra_losses={"flux_budget": budget_loss}`` with it (the trainer adds it by default)."""
    params = [p for m in flux_layers(model) if m.config.route == "learned" for p in m.router.parameters()]
    if not params:
        raise ValueError(
            "router_groups needs a model with learned Flux layers (route='learned'); it has none"
        )
    return [{"params": params, "lr": lr, "weight_decay": 0.0}]


def sparse_fraction(model: nn.Module) -> torch.Tensor:
    """s (B,): per sequence, the fraction of ``model``'s Flux layers on the sparse side in its last call."""
    layers = flux_layers(model)
    if not layers or any(m.last_route is None for m in layers):
        raise ValueError("sparse_fraction needs a model whose Flux layers have run a forward")
    return 1 - torch.stack([m.last_route.float() for m in layers]).mean(dim=0)


def budget_loss(model: nn.Module) -> torch.Tensor:
    """The paper's sparsity budget over ``model``'s Flux layers (the first layer's target and weights):
    mean over sequences of lambda1 |s - t| + lambda2 (s - t)^2, s from :func:`sparse_fraction`. Layers with a
    forced route have no gradient; a model without learned Flux layers gives 0."""
    layers = [m for m in flux_layers(model) if m.config.route == "learned"]
    if not layers or any(m.last_route is None for m in layers):
        return torch.zeros(())
    c = layers[0].config
    s = 1 - torch.stack([m.last_route.float() for m in layers]).mean(dim=0)
    gap = s - c.budget_target
    return (c.budget_weights[0] * gap.abs() + c.budget_weights[1] * gap.square()).mean()


register(
    MechanismSpec(
        key="flux",
        family="router",
        config_cls=FluxConfig,
        module_cls=FluxAttention,
        op=None,
        backends=BACKENDS,
        causal=True,
        bidirectional=False,
        paper="Flux Attention (arXiv 2604.07394)",
        notes="route decided once per sequence at prefill (one bit per layer from the whole prompt), kept "
        "in decoding; route=full / sparse force a side",
        extra={"test_options": {"window": 4, "sinks": 1, "pool_size": 2}},
    )
)
