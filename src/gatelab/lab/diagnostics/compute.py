"""Routing and compute of a trained LM: the fraction routed to the expensive path (router mixers'
``internals["route"]``), forward FLOPs per token at the task's length, and decode time per token.

FLOPs (the counts are defined once, in :mod:`gatelab.routers.flops`): a router mixer counts itself
(``flops_per_token(seq_len)`` at its last measured route); a softmax-family layer is its projections plus
causal attention over (L + 1) / 2 keys on average; sliding_window / hip / psa over their visible keys; a
linear mixer its projections plus its recurrent state's update and read-out; the rest of the LM counts 2 FLOPs
per weight of every matrix outside the mixers (MLP, LM head; the embedding is a lookup; an MoE MLP counts all
its experts). A mixer without a count makes the model's count None ("-" in the table), never a guess.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from gatelab.mixers._attention import AttentionMixer
from gatelab.mixers._linear import LinearMixer
from gatelab.registry import get
from gatelab.routers.flops import attention_flops, linear_flops, state_flops


def mixer_flops_per_token(mixer: nn.Module, seq_len: int) -> float | None:
    """Forward FLOPs per token of one mixer over ``seq_len`` tokens; None when it has no count."""
    if hasattr(mixer, "flops_per_token"):
        return float(mixer.flops_per_token(seq_len))
    key = getattr(mixer, "mechanism", None)
    if isinstance(mixer, AttentionMixer):
        counted = "softmax" if get(key).family == "softmax" else key
        attention = attention_flops(counted, mixer.config, seq_len)
        return None if attention is None else linear_flops(mixer) + attention
    if isinstance(mixer, LinearMixer):
        return linear_flops(mixer) + state_flops(key, *mixer.state_dims())
    return None


def model_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """Forward FLOPs per token of a lab LM (``blocks[i].mixer``, ``head``) over ``seq_len`` tokens."""
    total = 0.0
    for block in model.blocks:
        flops = mixer_flops_per_token(block.mixer, seq_len)
        if flops is None:
            return None
        total += flops + linear_flops(block, exclude=(block.mixer,))
    return total + 2.0 * model.head.weight.numel()


@torch.no_grad()
def routing_summary(model: nn.Module, inputs: torch.Tensor) -> dict | None:
    """One eval forward of ``inputs`` (B, T) with internals: {"expensive_fraction": mean over the router
    layers of each one's fraction routed to the expensive path, "unit": tokens / heads / layers / chunks,
    "per_layer": [...] (None for a layer that does not route)}; None when no layer routes."""
    _, _, internals = model(inputs, return_internals=True)
    per_layer = [(m or {}).get("route") for m in internals["mixers"]]
    routes = [r for r in per_layer if r is not None]
    if not routes:
        return None
    fractions = [float(r["expensive_fraction"]) for r in routes]
    units = sorted({r["unit"] for r in routes})
    layers = [None if r is None else float(r["expensive_fraction"]) for r in per_layer]
    return {
        "expensive_fraction": sum(fractions) / len(fractions),
        "unit": "/".join(units),
        "per_layer": layers,
    }


@torch.no_grad()
def decode_ms_per_token(model: nn.Module, inputs: torch.Tensor, prompt_len: int) -> float:
    """Milliseconds per decoded token: each sequence of ``inputs`` (B, T) prefills its first ``prompt_len``
    tokens, then feeds the rest one at a time with the states (teacher-forced, batch 1); only the steps are
    timed (wall clock, so a shared machine makes it noisy)."""
    if not 1 <= prompt_len < inputs.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {inputs.shape[1] - 1}], got {prompt_len}")
    elapsed, steps = 0.0, 0
    for row in inputs:
        row = row[None]
        _, states = model(row[:, :prompt_len])
        start = time.perf_counter()
        for t in range(prompt_len, row.shape[1]):
            _, states = model(row[:, t : t + 1], states)
        elapsed += time.perf_counter() - start
        steps += row.shape[1] - prompt_len
    return 1000.0 * elapsed / steps


def compute_summary(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    decode_sequences: int = 2) -> dict:  # fmt: skip
    """Routing, FLOPs per token at the batches' length and decode ms per token of a trained LM (eval mode;
    the routers' route is measured on all the batches' sequences at once, then counted)."""
    if not batches:
        raise ValueError("compute_summary needs at least one batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = torch.cat([b[0] for b in batches]).to(device)  # (B, T)
    seq_len = inputs.shape[1]
    try:
        route = routing_summary(model, inputs)
        flops = model_flops_per_token(model, seq_len)
        decode = decode_ms_per_token(model, inputs[:decode_sequences], max(1, seq_len // 2))
    finally:
        model.train(was_training)
    return {"route": route, "flops_per_token": flops, "seq_len": seq_len, "decode_ms_per_token": decode,
            "decode_sequences": min(decode_sequences, inputs.shape[0])}  # fmt: skip
