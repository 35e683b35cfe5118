"""Gated softmax attention, the definition: fp32 dense softmax attention, then the gate on its output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatelab.ops.softmax.reference import softmax_reference

GATE_FUNCTIONS = ("sigmoid", "silu", "ns_sigmoid")
COMBINES = ("multiply", "add")


def gate_activation(logits: torch.Tensor, gate_fn: str) -> torch.Tensor:
    """sigmoid, SiLU, or the paper's NS-sigmoid ablation 0.5 + 0.5 * sigmoid (never closes fully)."""
    if gate_fn == "sigmoid":
        return torch.sigmoid(logits)
    if gate_fn == "silu":
        return F.silu(logits)
    return 0.5 + 0.5 * torch.sigmoid(logits)


def apply_gate(y: torch.Tensor, logits: torch.Tensor, gate_fn: str = "sigmoid", combine: str = "multiply"):
    """y (..., D) gated by logits (..., D) elementwise or (..., 1) headwise: y * act(g) or y + act(g)."""
    g = gate_activation(logits, gate_fn)
    return y * g if combine == "multiply" else y + g


def gated_softmax_reference(q, k, v, gate, *, causal=True, scale=None, gate_fn="sigmoid", combine="multiply"):
    o = softmax_reference(q, k, v, causal=causal, scale=scale).float()  # (B, T, H, V) fp32
    return apply_gate(o, gate.float(), gate_fn, combine).to(q.dtype)
