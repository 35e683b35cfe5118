"""Flow-Attention in linear time: the flows from running sums (cumsum), the weighted values through the
chunked causal linear attention (or the global product when bidirectional)."""

from __future__ import annotations

import torch

from gatelab.ops.common.chunk import causal_linear_attention_chunk, global_linear_attention

from .state import FlowState


def flow_chunk(
    q, k, v, *, causal=True, eps=1e-6, chunk_size=64, initial_state=None, output_final_state=False
):
    """Flow-Attention with O(T) time and memory; see ``gatelab.ops.flow`` for shapes."""
    B, T, H, K = q.shape
    fq, fk = torch.sigmoid(q.float()), torch.sigmoid(k.float())  # (B, T, H, K)
    s = FlowState.zeros(B, H, K, 1, q.device) if initial_state is None else initial_state.float()
    if causal:
        run = lambda x, start: start[:, None] + x.cumsum(1)  # running sum continuing from the state
        n = s.count[:, None, :] + torch.arange(1, T + 1, device=q.device, dtype=torch.float32)[None, :, None]
    else:
        run = lambda x, start: x.sum(1, keepdim=True)
        n = torch.ones(1, 1, 1, device=q.device)
    incoming = n / ((fq + eps) * (run(fk, s.k_sum) + eps)).sum(-1)  # (B, T, H)
    outgoing = n / ((fk + eps) * (run(fq, s.q_sum) + eps)).sum(-1)
    k_out, q_in = fk * outgoing[..., None], fq * incoming[..., None]
    conserved_sink = ((fq + eps) * (run(k_out, s.k_out) + eps)).sum(-1) / n
    conserved_source = (((fk + eps) * (run(q_in, s.q_in) + eps)).sum(-1) / n).clamp(-1.0, 1.0)
    allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source)  # bounded by the clamp
    if causal:
        competition = e / run(e, s.exp_sum) * n
    else:
        competition = torch.softmax(conserved_source, dim=1) * T
    q_weighted = fq * (incoming / n)[..., None]  # (B, T, H, K)
    vc = v.float() * competition[..., None]  # (B, T, H, V)
    if causal:
        o, kv = causal_linear_attention_chunk(
            q_weighted, fk, vc, None if initial_state is None else s.kv, chunk_size
        )
    else:
        o, kv = global_linear_attention(q_weighted, fk, vc), None
    o = o * allocation[..., None]
    final = None
    if output_final_state:
        final = FlowState(
            kv,
            s.k_sum + fk.sum(1),
            s.q_sum + fq.sum(1),
            s.k_out + k_out.sum(1),
            s.q_in + q_in.sum(1),
            s.exp_sum + e.sum(1),
            s.count + T,
        )
    return o.to(q.dtype), final
