"""Flow-Attention (Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022))."""

from __future__ import annotations

import torch

from gatelab.ops.common.checks import check_attention_values, check_cu_seqlens, check_qkv
from gatelab.ops.common.linear import run_linear
from gatelab.ops.lina import check_options, check_state_free

from .chunk import flow_chunk
from .recurrent import flow_recurrent, flow_step
from .reference import flow_attention_matrix, flow_reference, flows
from .state import FlowState, check_flow_state

_FUNCTIONS = {"reference": flow_reference, "chunk": flow_chunk, "recurrent": flow_recurrent}
BACKENDS = tuple(_FUNCTIONS)


def flow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: FlowState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, FlowState | None]:
    """Flow-Attention.

    Attention as flow from sources (keys) to sinks (queries) with conservation, competition among the
    sources and allocation of the sinks.

    With sigmoid features phi(q_t), phi(k_s) and n_t the tokens seen (causal; 1 in the bidirectional form):
        I_t = n_t / (phi(q_t) + eps) . (sum_s phi(k_s) + eps)       incoming flow of sink t
        O_s = n_s / (phi(k_s) + eps) . (sum_t phi(q_t) + eps)       outgoing flow of source s
        I^_t = (phi(q_t) + eps) . (sum_s phi(k_s) O_s + eps) / n_t   conserved incoming flow
        O^_s = clamp((phi(k_s) + eps) . (sum_t phi(q_t) I_t + eps) / n_s, -1, 1)   conserved outgoing flow
        competition c_s = softmax over the sources of O^ times their number (causal: exp(O^_s) / sum_{r<=s}
        exp(O^_r) * n_s), allocation a_t = sigmoid(I^_t),
        o_t = a_t * (phi(q_t) I_t / n_t) sum_s phi(k_s)^T (c_s v_s)
    with every sum over s <= t when causal, as the official code (eps where it adds it, the clamp for stability).
    Two variants in the official code: the core file's causal version divides the incoming flow by n_t with a
    broadcast that only runs when T equals the head dim; its language-model version multiplies q by the raw
    incoming flow, I_t / n_t, as here. That version clamps O^ to [-5, 5]; the core file's [-1, 1] is used here.

    Args:
        q, k: (B, T, H, K) queries and keys before the sigmoid feature map.
        v: (B, T, H, V) values.
        causal: token t sees s <= t; False is the bidirectional form, which has no state.
        eps: as the official code, added to the features and the sums inside each flow.
        chunk_size: tokens per chunk of the chunk backend.
        initial_state: FlowState of fp32 running sums (see ``FlowState``: kv (B, H, K, V), k_sum, q_sum,
            k_out, q_in (B, H, K), exp_sum, count (B, H)); with cu_seqlens, N rows, one per sequence.
        output_final_state: return the FlowState after the last token.
        cu_seqlens: (N+1,) int offsets of N packed sequences in a (1, T, ...) batch; each runs on its own.
        backend: "reference" (dense fp32), "chunk", "recurrent" (causal only), or "auto" (chunk).
    Returns:
        o: (B, T, H, V) in q's dtype; final FlowState or None.
    """
    check_qkv(q, k, v, same_length=True)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"flow: q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}"
        )
    check_options("flow", causal, eps, chunk_size, backend)
    check_state_free("flow", causal, initial_state, output_final_state)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    B, T, H, K = q.shape
    if initial_state is not None:
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        initial_state = check_flow_state(initial_state, n, H, K, v.shape[-1], q.device)
    # q too: the flows' running sums carry every query into later tokens' weights
    check_attention_values("flow", T, causal=causal, q=q, k=k, v=v)
    return run_linear(
        "flow", backend, _FUNCTIONS, (q, k, v), chunk_size=chunk_size, causal=causal,
        eps=float(eps), initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


__all__ = [
    "flow",
    "flow_reference",
    "flow_chunk",
    "flow_recurrent",
    "flow_step",
    "flow_attention_matrix",
    "flows",
    "FlowState",
    "BACKENDS",
]
