"""LINA linear attention, the definition: dense fp32 T x T weights, division-based normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("relu", "elu", "identity")


def phi(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi: the non-negative feature map applied to queries and keys."""
    if name == "relu":
        return F.relu(x) + 1e-6  # LINA's code: ReLU plus 1e-6, so no feature is exactly zero
    if name == "elu":
        return F.elu(x) + 1.0  # Transformers are RNNs (Katharopoulos et al., 2020)
    return x  # "identity": the caller passes features that are already non-negative


def lina_features(q, k, v, key_gate, value_gate, feature_map_name: str):
    """fp32 phi(q) (B, T, H, K), gated phi(k) (B, T, H, K), gated v with a column of ones (B, T, H, V+1).

    The ones column carries the normaliser z through the same sums as the values (the state's last column).
    """
    fq = phi(q.float(), feature_map_name)
    fk = phi(k.float(), feature_map_name) * key_gate.float()[..., None]
    fv = v.float() * value_gate.float()[..., None]
    ones = torch.ones_like(fv[..., :1])
    return fq, fk, torch.cat([fv, ones], dim=-1)


def lina_weights(fq: torch.Tensor, fk: torch.Tensor, causal: bool) -> torch.Tensor:
    """Unnormalised weights phi(q_t) . g_s phi(k_s): (B, H, T, T), zero above the diagonal when causal."""
    A = torch.einsum("bthk,bshk->bhts", fq, fk)  # (B, H, T, T)
    if causal:
        T = fq.shape[1]
        A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=A.device).tril(), 0.0)
    return A


def lina_reference(
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
    """o_t = phi(q_t) S_t / (phi(q_t) z_t + eps) from the dense weights; see ``gatelab.ops.lina``."""
    V = v.shape[-1]
    fq, fk, fv = lina_features(q, k, v, key_gate, value_gate, feature_map)
    A = lina_weights(fq, fk, causal)
    num = torch.einsum("bhts,bshv->bthv", A, fv)  # (B, T, H, V+1): numerator and normaliser together
    if initial_state is not None:
        num = num + torch.einsum("bthk,bhkv->bthv", fq, initial_state.float())
    o = num[..., :V] / (num[..., V:] + eps)
    final = None
    if output_final_state:
        final = torch.einsum("bthk,bthv->bhkv", fk, fv)  # (B, H, K, V+1)
        if initial_state is not None:
            final = final + initial_state.float()
    return o.to(q.dtype), final


def lina_attention_matrix(q, k, key_gate, *, causal=True, feature_map="relu", eps=1e-6) -> torch.Tensor:
    """The equivalent attention matrix (B, H, T, T) in fp32: o_t = sum_s P[t, s] g_v(s) v_s (no initial state).

    Rows sum to z / (z + eps), i.e. to 1 up to eps.
    """
    fq = phi(q.float(), feature_map)
    fk = phi(k.float(), feature_map) * key_gate.float()[..., None]
    A = lina_weights(fq, fk, causal)
    return A / (A.sum(-1, keepdim=True) + eps)
