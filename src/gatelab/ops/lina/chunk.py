"""LINA linear attention, chunkwise-parallel: exact causal weights inside a chunk, a carried (K, V+1) state
between chunks; the bidirectional form is the global phi(K)^T V product."""

from __future__ import annotations

from gatelab.ops.common.chunk import causal_linear_attention_chunk, global_linear_attention

from .reference import lina_features


def lina_chunk(
    q,
    k,
    v,
    key_gate,
    value_gate,
    *,
    causal=True,
    feature_map="relu",
    eps=1e-6,
    chunk_size=64,
    initial_state=None,
    output_final_state=False,
):
    """Chunked LINA attention in fp32; see ``gatelab.ops.lina`` for shapes."""
    V = v.shape[-1]
    fq, fk, fv = lina_features(q, k, v, key_gate, value_gate, feature_map)
    if causal:
        h0 = None if initial_state is None else initial_state.float()
        num, final = causal_linear_attention_chunk(fq, fk, fv, h0, chunk_size)
    else:
        num, final = global_linear_attention(fq, fk, fv), None
    o = num[..., :V] / (num[..., V:] + eps)  # the last column is phi(q_t) z_t
    return o.to(q.dtype), (final if output_final_state else None)
