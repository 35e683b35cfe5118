"""Run every diagnostic of a trained LM over a fixed set of validation batches, in one pass each
(fp32 with internals, then W8A8), into one JSON-ready dict."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .activations import massive_activation_stats, sequence_outlier_stats, token_kurtosis
from .gates import gate_statistics
from .quant import w8a8_loss
from .sinks import attention_entropy, first_token_share, uniform_entropy, uniform_first_token_share

GATE_THRESHOLD = 0.1


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _max(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return max(values) if values else None


def _layer_keys(model: nn.Module, n: int) -> list:
    keys = getattr(model, "layer_keys", None)
    keys = keys() if callable(keys) else keys
    return list(keys) if keys is not None else [None] * n


@torch.no_grad()
def diagnose(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, quantization: bool = True
) -> dict:
    """All diagnostics of ``model`` on ``batches``.

    Args:
        model: an LM whose ``forward(idx, return_internals=True)`` returns (logits, states, internals)
            with internals["hidden"] = [h_0..h_L] each (B, T, d_model), internals["block_out"] = L tensors
            (B, T, d_model) and internals["mixers"] = L dicts (optionally "attn" (B, H, T, S), "gate").
        batches: list of (inputs (B, T) long, targets (B, T) long, -100 = ignored), all with the same T.
        quantization: also measure the loss after W8A8 fake quantisation (one more pass).
    Returns:
        per-layer lists (None where a layer has no such internals, e.g. no "attn" for a recurrent mixer)
        and a "summary" dict of one number per diagnostic, for tables.
    """
    if not batches:
        raise ValueError("diagnose needs at least one batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_seq = 0
    sink_sum: list = []
    entropy_sum: list = []
    gate_sum: list = []
    abs_hidden: list[list[torch.Tensor]] = []
    token_kurt_sum: list[float] = []
    inf_norms: list[list[torch.Tensor]] = []
    seq_kurt: list[list[torch.Tensor]] = []
    T = S = None
    try:
        for inputs, _targets in batches:
            _, _, internals = model(inputs.to(device), return_internals=True)
            B = inputs.shape[0]
            n_seq += B
            hidden, block_out, mixers = internals["hidden"], internals["block_out"], internals["mixers"]
            if not sink_sum:
                L = len(mixers)
                sink_sum, entropy_sum, gate_sum = [None] * L, [None] * L, [None] * L
                abs_hidden = [[] for _ in hidden]
                token_kurt_sum = [0.0] * len(hidden)
                inf_norms, seq_kurt = [[] for _ in block_out], [[] for _ in block_out]
            for i, h in enumerate(hidden):
                abs_hidden[i].append(h.detach().float().abs().flatten().cpu())
                token_kurt_sum[i] += float(token_kurtosis(h).nan_to_num(nan=0.0).mean()) * B
            for i, out in enumerate(block_out):
                norm, kurt = sequence_outlier_stats(out)
                inf_norms[i].append(norm.cpu())
                seq_kurt[i].append(kurt.cpu())
            for i, mix in enumerate(mixers):
                attn = mix.get("attn") if isinstance(mix, dict) else None
                if isinstance(attn, torch.Tensor):
                    T, S = attn.shape[-2], attn.shape[-1]
                    share, ent = first_token_share(attn).cpu() * B, attention_entropy(attn).cpu() * B
                    sink_sum[i] = share if sink_sum[i] is None else sink_sum[i] + share
                    entropy_sum[i] = ent if entropy_sum[i] is None else entropy_sum[i] + ent
                gate = mix.get("gate") if isinstance(mix, dict) else None
                if isinstance(gate, torch.Tensor) and gate.numel():
                    stats = gate_statistics(gate, GATE_THRESHOLD)
                    n = stats["count"]
                    prev = gate_sum[i] or (0.0, 0.0, 0)
                    gate_sum[i] = (
                        prev[0] + stats["mean"] * n,
                        prev[1] + stats["frac_below"] * n,
                        prev[2] + n,
                    )
    finally:
        model.train(was_training)

    sink = [None if s is None else (s / n_seq).tolist() for s in sink_sum]
    entropy = [None if e is None else (e / n_seq).tolist() for e in entropy_sum]
    massive = [massive_activation_stats(torch.cat(chunks)) for chunks in abs_hidden]
    block_inf = [float(torch.cat(v).mean()) for v in inf_norms]
    block_kurt = [float(torch.cat(v).nan_to_num(nan=0.0).mean()) for v in seq_kurt]
    result = {
        "layers": _layer_keys(model, len(sink)),
        "n_sequences": n_seq,
        "sink_share": sink,
        "sink_share_layer": [None if s is None else sum(s) / len(s) for s in sink],
        "sink_share_uniform": None if T is None else uniform_first_token_share(T, S),
        "attn_entropy": entropy,
        "attn_entropy_layer": [None if e is None else sum(e) / len(e) for e in entropy],
        "attn_entropy_uniform": None if T is None else uniform_entropy(T, S),
        "max_activation": [m["max"] for m in massive],
        "median_activation": [m["median"] for m in massive],
        "massive_ratio": [m["ratio"] for m in massive],
        "residual_kurtosis": [k / n_seq for k in token_kurt_sum],
        "block_inf_norm": block_inf,
        "block_kurtosis": block_kurt,
        "gate_mean": [None if g is None else g[0] / g[2] for g in gate_sum],
        "gate_frac_below": [None if g is None else g[1] / g[2] for g in gate_sum],
        "gate_threshold": GATE_THRESHOLD,
    }
    if quantization:
        result.update(w8a8_loss(model, batches))
    result["summary"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    """One number per diagnostic (None when no layer has it): the deepest layers are where outliers grow,
    so activations take the max over layers, as Quantizable Transformers do for the infinity norm."""
    return {
        "sink_share": _max(result["sink_share_layer"]),
        "sink_share_uniform": result["sink_share_uniform"],
        "attn_entropy": _mean(result["attn_entropy_layer"]),
        "max_activation": _max(result["max_activation"][1:]),
        "massive_ratio": _max(result["massive_ratio"][1:]),
        "residual_kurtosis": _max(result["residual_kurtosis"][1:]),
        "max_inf_norm": _max(result["block_inf_norm"]),
        "avg_kurtosis": _mean(result["block_kurtosis"]),
        "gate_mean": _mean(result["gate_mean"]),
        "gate_frac_below": _mean(result["gate_frac_below"]),
        "loss_fp32": result.get("loss_fp32"),
        "loss_w8a8": result.get("loss_w8a8"),
        "w8a8_gap": result.get("w8a8_gap"),
    }
