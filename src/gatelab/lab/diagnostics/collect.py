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
from .sinks import (
    attention_entropy,
    first_token_share,
    key_share,
    uniform_entropy,
    uniform_first_token_share,
    uniform_key_share,
)

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


class Collector:
    """Accumulates the diagnostics of one model over batches, from whatever exposes the internals: the
    lab's LM (``return_internals=True``) or forward hooks on a transformers model (gatelab.lab.diagnostics.hf).

    ``add`` takes one batch's internals; ``result`` gives the JSON-ready dict :func:`diagnose` returns.
    ``causal``: whether query t sees only keys <= t (sets the uniform-attention baselines).
    ``bos_token``: the id of the task's beginning-of-document token; with it, ``add`` takes the inputs and
    the result holds each head's share on the keys holding it and on position 1 (the first content token).
    """

    def __init__(self, causal: bool = True, bos_token: int | None = None):
        self.causal, self.bos_token = causal, bos_token
        self.n_seq = 0
        self.bos_uniform_sum = 0.0
        self.sink_sum: list = []
        self.bos_sum: list = []
        self.content_sum: list = []
        self.entropy_sum: list = []
        self.gate_sum: list = []
        self.abs_hidden: list[list[torch.Tensor]] = []
        self.token_kurt_sum: list[float] = []
        self.module_inf: list[dict[str, list[torch.Tensor]]] = []
        self.module_kurt: list[dict[str, list[torch.Tensor]]] = []
        self.T = self.S = None

    def add(
        self,
        hidden: Sequence[torch.Tensor],
        block_out: Sequence,
        mixers: Sequence,
        inputs: torch.Tensor | None = None,
    ) -> None:
        """One batch of B sequences.

        Args:
            hidden: [h_0..h_L], each (B, T, d_model): the residual stream before and after each block.
            block_out: L entries, each a (B, T, d_model) tensor (what the block adds to the residual
                stream) or a dict module name -> (B, T, d) output of each module hooked in that layer.
            mixers: L dicts, optionally with "attn" (B, H, T, S) probabilities and "gate" (any shape).
            inputs: (B, T) token ids, needed when the collector has a ``bos_token`` (keys = queries: S == T).
        """
        B = hidden[0].shape[0]
        is_bos = None
        if self.bos_token is not None:
            if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2 or inputs.shape[0] != B:
                shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                raise ValueError(
                    f"inputs must be the (B, T) token ids with B={B} when bos_token is set, got {shape}"
                )
            is_bos = inputs == self.bos_token  # (B, T)
            self.bos_uniform_sum += uniform_key_share(is_bos, self.causal) * B
        self.n_seq += B
        if not self.sink_sum:
            L = len(mixers)
            self.sink_sum, self.entropy_sum, self.gate_sum = [None] * L, [None] * L, [None] * L
            self.bos_sum, self.content_sum = [None] * L, [None] * L
            self.abs_hidden = [[] for _ in hidden]
            self.token_kurt_sum = [0.0] * len(hidden)
            self.module_inf, self.module_kurt = [{} for _ in block_out], [{} for _ in block_out]
        for i, h in enumerate(hidden):
            self.abs_hidden[i].append(h.detach().float().abs().flatten().cpu())
            self.token_kurt_sum[i] += float(token_kurtosis(h).nan_to_num(nan=0.0).mean()) * B
        for i, outs in enumerate(block_out):
            for name, out in (outs if isinstance(outs, dict) else {"block": outs}).items():
                norm, kurt = sequence_outlier_stats(out)
                self.module_inf[i].setdefault(name, []).append(norm.cpu())
                self.module_kurt[i].setdefault(name, []).append(kurt.cpu())
        for i, mix in enumerate(mixers):
            attn = mix.get("attn") if isinstance(mix, dict) else None
            if isinstance(attn, torch.Tensor):
                self.T, self.S = attn.shape[-2], attn.shape[-1]
                share, ent = first_token_share(attn).cpu() * B, attention_entropy(attn).cpu() * B
                self.sink_sum[i] = share if self.sink_sum[i] is None else self.sink_sum[i] + share
                self.entropy_sum[i] = ent if self.entropy_sum[i] is None else self.entropy_sum[i] + ent
                if is_bos is not None:
                    self._add_bos(i, attn, is_bos, B)
            gate = mix.get("gate") if isinstance(mix, dict) else None
            if isinstance(gate, torch.Tensor) and gate.numel():
                stats = gate_statistics(gate, GATE_THRESHOLD)
                n = stats["count"]
                prev = self.gate_sum[i] or (0.0, 0.0, 0)
                self.gate_sum[i] = (
                    prev[0] + stats["mean"] * n,
                    prev[1] + stats["frac_below"] * n,
                    prev[2] + n,
                )

    def _add_bos(self, i: int, attn: torch.Tensor, is_bos: torch.Tensor, B: int) -> None:
        """Layer i's shares on the BOS keys and on position 1 (attn (B, H, T, S), is_bos (B, T))."""
        if attn.shape[-1] != is_bos.shape[1]:
            raise ValueError(
                f"the BOS share needs one key per input token: attn has S={attn.shape[-1]} keys, inputs "
                f"T={is_bos.shape[1]} tokens"
            )
        first_content = torch.zeros_like(is_bos)
        first_content[:, 1:2] = True
        bos = key_share(attn, is_bos).cpu() * B
        content = key_share(attn, first_content).cpu() * B
        self.bos_sum[i] = bos if self.bos_sum[i] is None else self.bos_sum[i] + bos
        self.content_sum[i] = content if self.content_sum[i] is None else self.content_sum[i] + content

    def result(self, layers: list) -> dict:
        """The per-layer lists (None where a layer has no such internals). A layer's block inf-norm is the
        max over its hooked modules of their inf-norm averaged over sequences, its block kurtosis the mean
        over its modules (Quantizable Transformers' max / mean over modules; one module per layer for the
        lab's LM); "modules" keeps each module's pair."""
        n_seq, T, S = self.n_seq, self.T, self.S
        if n_seq == 0:
            raise ValueError("diagnose needs at least one batch")
        sink = [None if s is None else (s / n_seq).tolist() for s in self.sink_sum]
        bos = [None if s is None else (s / n_seq).tolist() for s in self.bos_sum]
        content = [None if s is None else (s / n_seq).tolist() for s in self.content_sum]
        entropy = [None if e is None else (e / n_seq).tolist() for e in self.entropy_sum]
        massive = [massive_activation_stats(torch.cat(chunks)) for chunks in self.abs_hidden]
        modules = [
            {
                name: {
                    "inf_norm": float(torch.cat(inf[name]).mean()),
                    "kurtosis": float(torch.cat(kurt[name]).nan_to_num(nan=0.0).mean()),
                }
                for name in inf
            }
            for inf, kurt in zip(self.module_inf, self.module_kurt)
        ]
        if T is None:
            uniform_share = uniform_ent = None
        elif self.causal:
            uniform_share, uniform_ent = uniform_first_token_share(T, S), uniform_entropy(T, S)
        else:  # every query sees all S keys
            uniform_share, uniform_ent = 1.0 / S, math.log(S)
        result = {
            "layers": layers,
            "n_sequences": n_seq,
            "sink_share": sink,
            "sink_share_layer": [None if s is None else sum(s) / len(s) for s in sink],
            "sink_share_uniform": uniform_share,
            "bos_token": self.bos_token,
            "bos_share": bos,
            "bos_share_layer": [None if s is None else sum(s) / len(s) for s in bos],
            "bos_share_uniform": None if self.bos_token is None else self.bos_uniform_sum / n_seq,
            "first_content_share": content,
            "first_content_share_layer": [None if s is None else sum(s) / len(s) for s in content],
            "attn_entropy": entropy,
            "attn_entropy_layer": [None if e is None else sum(e) / len(e) for e in entropy],
            "attn_entropy_uniform": uniform_ent,
            "max_activation": [m["max"] for m in massive],
            "median_activation": [m["median"] for m in massive],
            "massive_ratio": [m["ratio"] for m in massive],
            "residual_kurtosis": [k / n_seq for k in self.token_kurt_sum],
            "block_inf_norm": [max(m["inf_norm"] for m in layer.values()) for layer in modules],
            "block_kurtosis": [sum(m["kurtosis"] for m in layer.values()) / len(layer) for layer in modules],
            "gate_mean": [None if g is None else g[0] / g[2] for g in self.gate_sum],
            "gate_frac_below": [None if g is None else g[1] / g[2] for g in self.gate_sum],
            "gate_threshold": GATE_THRESHOLD,
        }
        if any(set(layer) != {"block"} for layer in modules):
            result["modules"] = modules
        return result


@torch.no_grad()
def diagnose(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    quantization: bool = True,
    bos_token: int | None = None,
) -> dict:
    """All diagnostics of ``model`` on ``batches``.

    Args:
        model: an LM whose ``forward(idx, return_internals=True)`` returns (logits, states, internals)
            with internals["hidden"] = [h_0..h_L] each (B, T, d_model), internals["block_out"] = L tensors
            (B, T, d_model) and internals["mixers"] = L dicts (optionally "attn" (B, H, T, S), "gate").
        batches: list of (inputs (B, T) long, targets (B, T) long, -100 = ignored), all with the same T.
        quantization: also measure the loss after W8A8 fake quantisation (one more pass).
        bos_token: the task's beginning-of-document token (``task.bos_token``); with it the result also
            holds the share of attention on the keys holding it ("bos_share") and on position 1
            ("first_content_share"), beside the first token's ("sink_share"); without it those are None.
    Returns:
        per-layer lists (None where a layer has no such internals, e.g. no "attn" for a recurrent mixer)
        and a "summary" dict of one number per diagnostic, for tables.
    """
    if not batches:
        raise ValueError("diagnose needs at least one batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collector = Collector(causal=True, bos_token=bos_token)
    try:
        for inputs, _targets in batches:
            _, _, internals = model(inputs.to(device), return_internals=True)
            collector.add(internals["hidden"], internals["block_out"], internals["mixers"], inputs)
    finally:
        model.train(was_training)
    result = collector.result(_layer_keys(model, len(collector.sink_sum)))
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
        "bos_share": _max(result.get("bos_share_layer") or []),
        "bos_share_uniform": result.get("bos_share_uniform"),
        "first_content_share": _max(result.get("first_content_share_layer") or []),
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
