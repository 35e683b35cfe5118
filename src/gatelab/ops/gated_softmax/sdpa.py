"""Gated softmax attention on SDPA: FlashAttention-class attention, then the gate as an epilogue.

On CUDA the sigmoid-multiply epilogue is compiled into one fused kernel (torch.compile), so the gate reads
the attention output and the gate logits once and writes once; elsewhere it runs eagerly.
"""

from __future__ import annotations

import functools

import torch

from gatelab.ops.softmax.sdpa import softmax_sdpa

from .reference import apply_gate


@functools.cache
def _compiled_gate():
    return torch.compile(apply_gate, dynamic=True, fullgraph=True)


def gated_softmax_sdpa(q, k, v, gate, *, causal=True, scale=None, gate_fn="sigmoid", combine="multiply"):
    o = softmax_sdpa(q, k, v, causal=causal, scale=scale)  # (B, T, H, V)
    epilogue = _compiled_gate() if q.is_cuda else apply_gate
    return epilogue(o, gate, gate_fn, combine)
