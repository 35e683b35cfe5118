"""Causal Flow-Attention one token at a time with carried running sums: what decoding runs."""

from __future__ import annotations

import torch

from .state import FlowState


def flow_step(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: FlowState, eps: float):
    """One token: fq, fk (B, H, K) sigmoid features, v (B, H, V) fp32. Returns o (B, H, V) and the new state."""
    n = state.count + 1  # (B, H)
    k_sum, q_sum = state.k_sum + fk, state.q_sum + fq
    incoming = n / ((fq + eps) * (k_sum + eps)).sum(-1)
    outgoing = n / ((fk + eps) * (q_sum + eps)).sum(-1)
    k_out = state.k_out + fk * outgoing[..., None]
    q_in = state.q_in + fq * incoming[..., None]
    conserved_sink = ((fq + eps) * (k_out + eps)).sum(-1) / n
    conserved_source = (((fk + eps) * (q_in + eps)).sum(-1) / n).clamp(-1.0, 1.0)
    e = torch.exp(conserved_source)
    exp_sum = state.exp_sum + e
    competition = e / exp_sum * n
    kv = state.kv + fk[..., :, None] * (v * competition[..., None])[..., None, :]
    o = (
        torch.einsum("bhk,bhkv->bhv", fq * (incoming / n)[..., None], kv)
        * torch.sigmoid(conserved_sink)[..., None]
    )
    return o, FlowState(kv, k_sum, q_sum, k_out, q_in, exp_sum, n)


def flow_recurrent(q, k, v, *, causal=True, eps=1e-6, initial_state=None, output_final_state=False):
    """Token-by-token causal Flow-Attention in fp32; see ``gatelab.ops.flow`` for shapes."""
    if not causal:
        raise ValueError(
            "flow: the recurrent backend runs the causal form only; use backend='chunk' for causal=False"
        )
    B, T, H, K = q.shape
    fq, fk, vf = torch.sigmoid(q.float()), torch.sigmoid(k.float()), v.float()
    state = (
        FlowState.zeros(B, H, K, v.shape[-1], q.device) if initial_state is None else initial_state.float()
    )
    outputs = []
    for t in range(T):
        o_t, state = flow_step(fq[:, t], fk[:, t], vf[:, t], state, eps)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    return o.to(q.dtype), (state if output_final_state else None)
