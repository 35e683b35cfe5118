"""LINA linear attention, one token at a time with a carried (K, V+1) state: what decoding runs."""

from __future__ import annotations

import torch

from .reference import lina_features


def lina_step(
    fq: torch.Tensor, fk: torch.Tensor, fv: torch.Tensor, state: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on features: fq, fk (B, H, K), fv (B, H, V+1) with the ones column, state (B, H, K, V+1).

    Returns o (B, H, V) and the new state.
    """
    state = state + fk[..., :, None] * fv[..., None, :]
    num = torch.einsum("bhk,bhkv->bhv", fq, state)  # (B, H, V+1)
    return num[..., :-1] / (num[..., -1:] + eps), state


def lina_recurrent(
    q,
    k,
    v,
    key_gate,
    value_gate,
    *,
    causal=True,
    feature_map="relu",
    eps=1e-6,
    initial_state=None,
    output_final_state=False,
):
    """Token-by-token causal LINA attention in fp32; see ``gatelab.ops.lina`` for shapes."""
    if not causal:
        raise ValueError(
            "lina: the recurrent backend runs the causal form only; use backend='chunk' for causal=False"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    fq, fk, fv = lina_features(q, k, v, key_gate, value_gate, feature_map)
    state = fq.new_zeros(B, H, K, V + 1) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        o_t, state = lina_step(fq[:, t], fk[:, t], fv[:, t], state, eps)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    return o.to(q.dtype), (state if output_final_state else None)
