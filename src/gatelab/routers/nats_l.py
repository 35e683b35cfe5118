"""NAtS-L: one layer that runs Gated DeltaNet and softmax attention on the same q/k/v and routes each chunk
of tokens, per head, to one of them (Neural Attention Search Linear, arXiv 2602.03681; the method as in its
official code, automl/NeuralAttentionSearchLinear @90b4315, layers/natsl_attn_gdn.py and ops/mixed_ops).

Per GDN head h and chunk c of ``route_chunk`` tokens (chunks counted from the sequence start):

- router: s_c = W_route mean_{t in c} x_t (2 logits per head), a hard argmax of softmax(s_c) with a
  straight-through gradient (index 0 = softmax, 1 = GDN); ``sample="gumbel"`` adds Gumbel noise in training.
- softmax branch (NoPE, RMSNorm on q and k per attention head; each GDN head is ``attn_split`` attention
  heads sharing its decision): query t sees its own chunk causally and every earlier chunk routed to softmax.
- GDN branch: each chunk runs the delta rule from the state at its start; only GDN-routed chunks write the
  state; a softmax-routed chunk leaves it decayed by its gates (``decay_skipped``) or unchanged.
- output: [w_gdn g1 . RMSNorm(o_gdn) + w_attn g2 . RMSNorm(o_attn)] . SiLU(g), (w_attn, w_gdn) = softmax(W_w q).
- router gradient (the code's custom backward, written as autograd): the softmax branch multiplies the
  exp(scores) of a routed chunk's keys by its straight-through value, and the GDN branch moves the state by
  m (S_end - S_skip) with m the GDN value; each branch sends gradient only through the chunks routed to it.

The type of chunk c acts only on chunks after it, so the code's training rule that forces the last chunk to
"both" ops (to record the final state) holds here by construction: the chunk still open at the end of a
call is held by both branches in the state (its keys and values, its running GDN state) and is routed when
it completes. Decoding keeps keys and values only of softmax-routed chunks (plus the open chunk) and the GDN
state, and equals the parallel pass (the code's NAtSLayerCache rule). No cost loss: the code has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.mixers._base import StateSignature, check_choice, check_positive
from gatelab.mixers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from gatelab.ops.gated_deltanet import BACKENDS, gated_deltanet, l2_normalize
from gatelab.registry import MechanismSpec, register

from ._common import route_record, straight_through, weighted_attention

ROUTES = ("learned", "softmax", "linear")


@dataclass
class NAtSLConfig(GatedDeltaNetConfig):
    route_chunk: int = 64  # tokens per routed chunk (the code's nats_block_size)
    attn_split: int = 2  # softmax heads per GDN head (the 340M config: 6 GDN heads of K=128 -> 12 of 64)
    decay_skipped: bool = True  # a softmax-routed chunk decays the GDN state by its gates (released configs)
    sample: str = "argmax"  # "argmax" (the released runs) or "gumbel" (noise in training only)
    route: str = "learned"  # "softmax" / "linear": every chunk forced to one side (tests, ablations)
    # ``backend`` picks the GDN branch's backend; the softmax branch is dense (per-key router multipliers)

    def __post_init__(self):
        super().__post_init__()
        check_positive("route_chunk", self.route_chunk)
        check_positive("attn_split", self.attn_split)
        check_choice("sample", self.sample, ("argmax", "gumbel"))
        check_choice("route", self.route, ROUTES)
        for name, width in (("head_dim", self.key_dim), ("value head dim", self.value_dim)):
            if width % self.attn_split:
                raise ValueError(f"attn_split ({self.attn_split}) must divide the {name} ({width})")


@dataclass
class NAtSLState:
    """The decoding state. GDN: ``committed`` (B, H, K, V) fp32 the state at the open chunk's start,
    ``running`` the state after its tokens, ``conv`` the short-convolution inputs. Softmax: ``k`` (B, S, Ha,
    Dk), ``v`` (B, S, Ha, Dv) the kept keys/values of softmax-routed chunks, per head compacted to the front,
    ``keep`` (B, S, Ha) their multipliers (0: a padding slot of a head that kept fewer). The open chunk:
    ``open_k``/``open_v`` its keys/values, ``open_x`` (B, n, d_model) its inputs (the router reads their mean)
    and ``open_g`` (B, n, H) its log decays. ``length`` counts the tokens seen."""

    committed: torch.Tensor
    running: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    open_k: torch.Tensor
    open_v: torch.Tensor
    open_x: torch.Tensor
    open_g: torch.Tensor
    length: int
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    signature: StateSignature | None = field(default=None, kw_only=True)

    @property
    def kept_tokens(self) -> int:
        """Keys held for the softmax branch, summed over batch rows and heads (padding slots excluded)."""
        return int((self.keep > 0).sum()) + self.open_k.shape[0] * self.open_k.shape[1] * self.open_k.shape[2]


def compact(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """Move each (batch row, head)'s kept slots (keep > 0) to the front, in order, and cut the slots no head
    keeps: k (B, S, Ha, Dk), v (B, S, Ha, Dv), keep (B, S, Ha) -> the same, S' = max kept count."""
    kept = keep > 0
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, : int(kept.sum(1).max())]
    take = lambda t: t.gather(1, order[..., None].expand(-1, -1, -1, t.shape[-1]))
    return take(k), take(v), keep.gather(1, order)


class NAtSL(GatedDeltaNet):
    """x (B, T, d_model) -> y (B, T, d_model); state: :class:`NAtSLState`. Built on Gated DeltaNet's
    projections, gates and initialisation; the output norm weight g1 is per attention head (V / attn_split).

    internals: "route" (the fraction of decided (chunk, GDN head) pairs routed to softmax, the open chunk
    counted as softmax: its keys are held), "types" (B, H, n_chunks) 1.0 where a chunk of this call went to
    softmax, "mix" (B, T, Ha, 2) the output weights (w_attn, w_gdn), "gate"/"beta" as gated_deltanet.
    """

    config_cls = NAtSLConfig

    def __init__(self, config: NAtSLConfig):
        c = config
        self._attn_heads = c.n_heads * c.attn_split
        super().__init__(config)
        Ha, Dk, Dv = self._attn_heads, c.key_dim // c.attn_split, c.value_dim // c.attn_split
        self.route_proj = nn.Linear(c.d_model, 2 * c.n_heads, bias=False)  # the code's nats_layer
        self.mix_proj = nn.Linear(c.n_heads * c.key_dim, 2 * Ha, bias=False)  # nats_out_weights_layer
        self.q_norm = nn.RMSNorm(Dk, eps=c.norm_eps)
        self.k_norm = nn.RMSNorm(Dk, eps=c.norm_eps)
        self.o_norm_weight = nn.Parameter(torch.ones(Dv))  # g1 on the GDN output, per attention head
        self.attn_norm_weight = nn.Parameter(torch.ones(Dv))  # g2 on the softmax output
        self.last_fraction: torch.Tensor | None = None  # the last call's routed fraction (flops_per_token)

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        super().reset_parameters(std, n_layers)
        for lin in (getattr(self, "route_proj", None), getattr(self, "mix_proj", None)):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
        if hasattr(self, "attn_norm_weight"):
            with torch.no_grad():
                self.attn_norm_weight.fill_(1.0)

    # pieces -----------------------------------------------------------------------------------------
    def project(self, x, conv):
        """q, k (B, T, H, K) L2-normalised, v (B, T, H, V), g, beta (B, T, H), the pre-norm q (B, T, H*K)
        that the output weights read, the convolution inputs to carry."""
        c = self.config
        B, T, _ = x.shape
        H, K, V = c.n_heads, c.key_dim, c.value_dim
        q, k, v, conv = self.convolved(x, conv)
        g, beta = self.gates(x)
        return (l2_normalize(q.view(B, T, H, K)), l2_normalize(k.view(B, T, H, K)), v.view(B, T, H, V), g,
                beta, q, conv)  # fmt: skip

    def choose(self, x_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x of one complete chunk (B, C, d_model) -> (m_softmax, m_gdn) (B, H): the hard choice (exactly 0
        or 1) carrying the straight-through gradient only where it was chosen."""
        c = self.config
        B = x_chunk.shape[0]
        if c.route != "learned":
            side = torch.zeros(B, c.n_heads, 2, device=x_chunk.device)
            side[..., 0 if c.route == "softmax" else 1] = 1.0
            return side[..., 0], side[..., 1]
        logits = self.route_proj(x_chunk.mean(1)).float().view(B, c.n_heads, 2)
        if c.sample == "gumbel" and self.training:
            logits = logits - torch.empty_like(logits).exponential_().log()  # + Gumbel(0, 1) noise
        soft = logits.softmax(-1)
        hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        tau = straight_through(hard, soft) * hard  # gradient only through the side it went to
        return tau[..., 0], tau[..., 1]

    def fresh_state(self, x: torch.Tensor) -> NAtSLState:
        c = self.config
        B, H, Ha = x.shape[0], c.n_heads, self._attn_heads
        Dk, Dv = c.key_dim // c.attn_split, c.value_dim // c.attn_split
        S = x.new_zeros(B, H, c.key_dim, c.value_dim, dtype=torch.float32)
        empty = lambda *shape, dtype=x.dtype: x.new_zeros(B, 0, *shape, dtype=dtype)
        return NAtSLState(S, S, empty(Ha, Dk), empty(Ha, Dv), empty(Ha), empty(Ha, Dk), empty(Ha, Dv),
                          empty(c.d_model), empty(H, dtype=torch.float32), 0)  # fmt: skip

    def _forward(self, x, state, return_internals):
        c = self.config
        B, H = x.shape[0], c.n_heads
        if state is not None:
            self.check_state(state, NAtSLState, B)
        o_gdn, o_attn, q_raw, g, beta, new_state, decided = self.branches(x, state)
        out, mix = self.combine(o_gdn, o_attn, q_raw, x)
        pending = 1 if new_state.open_x.shape[1] else 0
        fraction = (decided.sum((1, 2)).mean() / H + pending) / max(1, decided.shape[-1] + pending)
        self.last_fraction = fraction.detach()
        if not return_internals:
            return out, new_state, {}
        return out, new_state, {"route": route_record(fraction, "chunks"), "types": decided,
                                "mix": mix, "gate": g.detach().exp(), "beta": beta.detach()}  # fmt: skip

    def branches(self, x, state=None):
        """The two branches over x (B, T, d_model) after ``state`` (None: a fresh sequence): o_gdn (B, T, H, V),
        o_attn (B, T, Ha, Dv) fp32, the pre-norm q, g and beta (B, T, H), the new state and the decisions
        (B, H, n) of the n chunks completed in this call (1.0: softmax)."""
        c = self.config
        B, T, _ = x.shape
        H, Ha, s, C = c.n_heads, self._attn_heads, c.attn_split, c.route_chunk
        st = self.fresh_state(x) if state is None else state
        q, k, v, g, beta, q_raw, conv = self.project(x, st.conv)
        # the softmax branch's view of the same q/k/v: s heads per GDN head, RMSNorm, no positions
        qa = self.q_norm(q.reshape(B, T, Ha, -1))  # (B, T, Ha, Dk)
        ka = self.k_norm(k.reshape(B, T, Ha, -1))
        va = v.reshape(B, T, Ha, -1)  # (B, T, Ha, Dv)
        committed, running = st.committed, st.running
        cache_k, cache_v, keep = st.k, st.v, st.keep
        open_k, open_v, open_x, open_g = st.open_k, st.open_v, st.open_x, st.open_g
        o_gdn, o_attn, types = [], [], []
        a = 0
        while a < T:
            b = min(T, a + C - open_x.shape[1])  # this piece ends where the open chunk ends (or the call)
            o, running = gated_deltanet(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                        initial_state=running, output_final_state=True,
                                        chunk_size=c.chunk_size, backend=self.step_backend(x[:, a:b]))  # fmt: skip
            o_gdn.append(o)
            n, m = open_k.shape[1], b - a
            keys = torch.cat([cache_k, open_k, ka[:, a:b]], 1)  # (B, S, Ha, Dk)
            values = torch.cat([cache_v, open_v, va[:, a:b]], 1)
            own = torch.ones(m, n + m, device=x.device).tril(n)  # the open chunk, causally
            weights = torch.cat([keep.float().permute(0, 2, 1)[:, :, None].expand(B, Ha, m, -1),
                                 own.expand(B, Ha, m, n + m)], -1)  # fmt: skip
            o_attn.append(weighted_attention(qa[:, a:b], keys, values, weights)[0])
            open_k, open_v = torch.cat([open_k, ka[:, a:b]], 1), torch.cat([open_v, va[:, a:b]], 1)
            open_x, open_g = torch.cat([open_x, x[:, a:b]], 1), torch.cat([open_g, g[:, a:b]], 1)
            if open_x.shape[1] == C:  # the chunk is complete: route it
                m_attn, m_gdn = self.choose(open_x)  # (B, H)
                decay = open_g.sum(1).exp() if c.decay_skipped else torch.ones_like(m_gdn)
                skipped = decay[..., None, None] * committed  # (B, H, K, V)
                committed = running = skipped + m_gdn[..., None, None] * (running - skipped)
                row = m_attn.repeat_interleave(s, dim=1)[:, None].expand(B, C, Ha)  # (B, C, Ha)
                cache_k, cache_v = torch.cat([cache_k, open_k], 1), torch.cat([cache_v, open_v], 1)
                keep = torch.cat([keep, row.to(keep.dtype)], 1)
                open_k, open_v, open_x, open_g = (t[:, :0] for t in (open_k, open_v, open_x, open_g))
                types.append(m_attn.detach())
            a = b
        cache_k, cache_v, keep = compact(cache_k, cache_v, keep)
        new_state = NAtSLState(committed, running, cache_k, cache_v, keep, open_k, open_v, open_x, open_g,
                               st.length + T, conv, signature=self.state_signature(B))  # fmt: skip
        decided = torch.stack(types, -1) if types else x.new_zeros(B, H, 0)  # (B, H, n)
        return torch.cat(o_gdn, 1), torch.cat(o_attn, 1), q_raw, g, beta, new_state, decided

    def combine(self, o_gdn, o_attn, q_raw, x):
        """o_gdn (B, T, H, V), o_attn (B, T, Ha, Dv) -> y (B, T, d_model), the weights (B, T, Ha, 2): the
        weighted sum of the two normalised outputs (softmax(W_w q) per attention head), SiLU-gated, projected."""
        c = self.config
        B, T, Ha = x.shape[0], x.shape[1], self._attn_heads
        mix = self.mix_proj(q_raw).float().view(B, T, Ha, 2).softmax(-1)  # (w_attn, w_gdn)
        dv = c.value_dim // c.attn_split
        n_gdn = F.rms_norm(o_gdn.float().reshape(B, T, Ha, dv), (dv,), self.o_norm_weight.float(), c.norm_eps)
        n_attn = F.rms_norm(o_attn.float(), (dv,), self.attn_norm_weight.float(), c.norm_eps)
        o = (mix[..., 1:] * n_gdn + mix[..., :1] * n_attn) * F.silu(self.g_proj(x).float().view(B, T, Ha, dv))
        return self.o_proj(o.to(x.dtype).reshape(B, T, -1)), mix.detach()

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at ``seq_len`` (a multiply-add counts 2), from the last call's routed
        fraction f (1 before any call): projections 2 d (2HK + 2HV + 2H) (q, k; v, g; a, b) + 2HV d, the
        router 2 d 2H / C (once per chunk) and the output weights 2 HK 2Ha; the delta rule 6 H K V (k^T S, the
        rank-1 update, q S); softmax over the keys a query sees on average, (C + 1) / 2 of its own chunk +
        f (L - C) / 2 earlier, times 2 H (K + V). Short convolutions and norms are left out."""
        check_positive("seq_len", seq_len)
        c = self.config
        d, H, K, V, C, L = c.d_model, c.n_heads, c.key_dim, c.value_dim, c.route_chunk, seq_len
        f = 1.0 if self.last_fraction is None else float(self.last_fraction)
        Ha = self._attn_heads
        projections = 2 * d * (2 * H * K + 2 * H * V + 2 * H) + 2 * H * V * d + 4 * d * H / C + 4 * H * K * Ha
        seen = (min(C, L) + 1) / 2 + f * max(0, L - C) / 2
        return float(projections + 6 * H * K * V + 2 * seen * H * (K + V))


register(
    MechanismSpec(
        key="nats_l",
        family="router",
        config_cls=NAtSLConfig,
        module_cls=NAtSL,
        op=None,
        backends=BACKENDS,  # of the GDN branch; the softmax branch is dense (its per-key router multipliers)
        causal=True,
        bidirectional=False,
        paper="Neural Attention Search Linear: chunk-wise routing between Gated DeltaNet and softmax "
        "attention (NAtS-L, arXiv 2602.03681, 2026)",
        notes="per chunk and head, straight-through argmax between softmax (keys kept) and the GDN state",
        extra={"test_options": {"chunk_size": 4, "route_chunk": 4}},
    )
)
