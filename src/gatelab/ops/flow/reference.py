"""Flow-Attention, the definition: the flows from dense fp32 sums over a T x T mask, then the T x T weights."""

from __future__ import annotations

import torch

from .state import FlowState


def flows(fq: torch.Tensor, fk: torch.Tensor, causal: bool, eps: float, state: FlowState | None) -> dict:
    """Incoming / outgoing flows, conservation, competition and allocation, every sum as a dense T x T product.

    fq, fk: (B, T, H, K) fp32 sigmoid features. Returns a dict of (B, T, H) and (B, T, H, K) tensors:
    "q" = phi(q_t) I_t / n_t (the query weighted for value normalisation), "allocation", "competition",
    and the per-token terms the final state sums ("k_out", "q_in", "exp").
    """
    B, T, H, K = fq.shape
    mask = torch.ones(T, T, device=fq.device)
    if causal:
        mask = mask.tril()
    total = lambda x: torch.einsum("ts,bsh...->bth...", mask, x)  # sum over the sources each token sees
    s = FlowState.zeros(B, H, K, 1, fq.device) if state is None else state
    if causal:  # the causal version normalises by the number of tokens seen, n_t
        n = s.count[:, None, :] + torch.arange(1, T + 1, device=fq.device, dtype=torch.float32)[None, :, None]
    else:
        n = torch.ones(1, 1, 1, device=fq.device)
    # (1) incoming flow of each sink (query), outgoing flow of each source (key); eq. (5) with eps as the code
    k_sum = s.k_sum[:, None] + total(fk)  # (B, T, H, K)
    q_sum = s.q_sum[:, None] + total(fq)
    incoming = n / ((fq + eps) * (k_sum + eps)).sum(-1)  # (B, T, H)
    outgoing = n / ((fk + eps) * (q_sum + eps)).sum(-1)
    # (2) conservation: the flows once the other side is normalised
    k_out = fk * outgoing[..., None]
    q_in = fq * incoming[..., None]
    conserved_sink = ((fq + eps) * (s.k_out[:, None] + total(k_out) + eps)).sum(-1) / n
    conserved_source = ((fk + eps) * (s.q_in[:, None] + total(q_in) + eps)).sum(-1) / n
    conserved_source = conserved_source.clamp(-1.0, 1.0)  # as the official code, for stability
    # (3) allocation of each sink, competition among sources (softmax over the sources, times their number)
    allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source)  # in [1/e, e] after the clamp: no overflow, no max-subtraction needed
    if causal:
        competition = e / (s.exp_sum[:, None] + total(e)) * n
    else:
        competition = torch.softmax(conserved_source, dim=1) * T
    return {
        "q": fq * (incoming / n)[..., None],
        "allocation": allocation,
        "competition": competition,
        "k_out": k_out,
        "q_in": q_in,
        "exp": e,
    }


def flow_attention_matrix(q, k, *, causal=True, eps=1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The equivalent attention matrix P (B, H, T, T) fp32, o_t = sum_s P[t, s] v_s (no initial state),
    with the allocation (B, T, H) and competition (B, T, H) it is built from."""
    fq, fk = torch.sigmoid(q.float()), torch.sigmoid(k.float())
    f = flows(fq, fk, causal, eps, None)
    A = torch.einsum("bthk,bshk->bhts", f["q"], fk)  # (B, H, T, T)
    if causal:
        T = q.shape[1]
        A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=A.device).tril(), 0.0)
    P = f["allocation"].permute(0, 2, 1)[..., None] * A * f["competition"].permute(0, 2, 1)[:, :, None, :]
    return P, f["allocation"], f["competition"]


def flow_reference(q, k, v, *, causal=True, eps=1e-6, initial_state=None, output_final_state=False):
    """Flow-Attention from dense T x T weights in fp32; see ``gatelab.ops.flow`` for shapes."""
    B, T, H, K = q.shape
    fq, fk = torch.sigmoid(q.float()), torch.sigmoid(k.float())
    s0 = None if initial_state is None else initial_state.float()
    f = flows(fq, fk, causal, eps, s0)
    A = torch.einsum("bthk,bshk->bhts", f["q"], fk)  # (B, H, T, T)
    if causal:
        A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=A.device).tril(), 0.0)
    vc = v.float() * f["competition"][..., None]  # (B, T, H, V): competition reweights the sources
    o = torch.einsum("bhts,bshv->bthv", A, vc)
    if s0 is not None:
        o = o + torch.einsum("bthk,bhkv->bthv", f["q"], s0.kv)
    o = o * f["allocation"][..., None]  # allocation gates each sink's output
    final = None
    if output_final_state:
        s = FlowState.zeros(B, H, K, v.shape[-1], q.device) if s0 is None else s0
        final = FlowState(
            s.kv + torch.einsum("bthk,bthv->bhkv", fk, vc),
            s.k_sum + fk.sum(1),
            s.q_sum + fq.sum(1),
            s.k_out + f["k_out"].sum(1),
            s.q_in + f["q_in"].sum(1),
            s.exp_sum + f["exp"].sum(1),
            s.count + T,
        )
    return o.to(q.dtype), final
