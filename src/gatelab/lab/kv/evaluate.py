"""Quality, memory and speed of a trained LM under a KV-cache policy, and fine-tuning of attention gates
("In-context KV-Cache Eviction for LLMs via Attention-Gate", Zeng et al., 2024)."""

from __future__ import annotations

import copy
import random
import time

import torch
import torch.nn.functional as F

from gatelab.cache import apply_policy, cache_bytes, remove_policy
from gatelab.lab.tasks import IGNORE
from gatelab.lab.train import TrainConfig, train


@torch.no_grad()
def decode_eval(model, batches: list, policy: str = "full", **options) -> dict:
    """Teacher-forced token-by-token decoding of every batch under ``policy``.

    batches: [(inputs (B, T) long, targets (B, T) long with IGNORE on unlabelled positions)]. Every token
    is fed alone with the layer states, so each prediction sees exactly what the policy kept.
    Returns loss and accuracy over labelled positions, the decode speed (tokens/s), and cache memory:
    bytes held per layer at the end (keys and values; an attention gate's own state separately), peak
    bytes held (all layers, gate states included, max over steps), the kept fraction (kept tokens /
    tokens seen, mean over layers), the held fraction (bytes allocated, gate states included / bytes of
    a full cache; above the kept fraction when heads keep different numbers of tokens: the cache is
    rectangular, padded to its longest row) and the kept-bytes fraction (bytes of the kept tokens plus
    the gate states / bytes of a full cache: what a cache without padding would hold) at the end.
    """
    was_training = model.training
    model.eval()
    if policy != "attention_gate":  # a gated model comes with its gates (see finetune_gates)
        apply_policy(model, policy, **options)
    loss_sum, hits, count, tokens, seconds, peak = 0.0, 0, 0, 0, 0.0, 0
    per_layer, kept, held, needed = None, [], [], []
    try:
        for inputs, targets in batches:
            B, T = inputs.shape
            states, logits = None, []
            start = time.perf_counter()
            for t in range(T):
                out, states = model(inputs[:, t : t + 1], states)
                logits.append(out[:, -1].float())
                # bytes allocated only: cache_bytes would also count kept tokens, a reduction per layer and step
                peak = max(peak, sum(s.nbytes + getattr(s, "gate_nbytes", 0) for s in states))
            seconds += time.perf_counter() - start
            tokens += B * T
            logits = torch.stack(logits, dim=1)  # (B, T, vocab)
            labelled = targets != IGNORE
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            hits += int(((logits.argmax(-1) == targets) & labelled).sum())
            count += int(labelled.sum())
            per_layer = cache_bytes(states)
            full = B * T * states[0].k.shape[2]  # tokens a full cache holds per layer
            kept.append(sum(layer["tokens"] for layer in per_layer) / (full * len(per_layer)))
            k, v = states[0].k, states[0].v
            full_bytes = full * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
            held.append(
                sum(layer["held"] + layer["gate"] for layer in per_layer) / (full_bytes * len(per_layer))
            )
            needed.append(
                sum(layer["kept"] + layer["gate"] for layer in per_layer) / (full_bytes * len(per_layer))
            )
    finally:
        if policy != "attention_gate":
            remove_policy(model)
        model.train(was_training)
    return {
        "loss": loss_sum / max(count, 1),
        "accuracy": hits / max(count, 1),
        "kept_fraction": sum(kept) / len(kept),
        "held_fraction": sum(held) / len(held),
        "kept_bytes_fraction": sum(needed) / len(needed),
        "bytes_per_layer": [layer["held"] for layer in per_layer],
        "kept_bytes_per_layer": [layer["kept"] for layer in per_layer],
        "gate_bytes_per_layer": [layer["gate"] for layer in per_layer],
        "peak_cache_bytes": peak,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def finetune_gates(
    model,
    task,
    target_keep: float,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-4,
    gate_lr: float = 1e-2,
    seed: int = 0,
    eviction_weight: float = 4.0,
    **gate_options,
):
    """A copy of ``model`` with an attention gate in every layer, fine-tuned on ``task`` for cross-entropy +
    the gates' eviction-rate loss towards ``target_keep``: the gates at ``gate_lr`` (they start from
    scratch, initialised from ``seed``), the LM at ``lr`` (0 freezes it). Returns (model, history)."""
    tuned = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):  # the gates' init depends on the seed, not on what ran before
        torch.manual_seed(seed)
        apply_policy(
            tuned, "attention_gate", target_keep=target_keep, eviction_weight=eviction_weight, **gate_options
        )
    gates = [p for n, p in tuned.named_parameters() if ".cache_policy." in n]
    return _tune(tuned, task, steps, batch_size, seed, gates=gates, gate_lr=gate_lr, lr=lr)


def finetune_lm(model, task, steps: int, batch_size: int = 16, lr: float = 3e-4, seed: int = 0):
    """A copy of ``model`` fine-tuned on ``task`` exactly as :func:`finetune_gates` tunes the LM, without
    gates: the control that gives the training-free policies the same LM updates. Returns (model, history)."""
    return _tune(copy.deepcopy(model), task, steps, batch_size, seed, gates=[], gate_lr=0.0, lr=lr)


def _tune(tuned, task, steps: int, batch_size: int, seed: int, *, gates: list, gate_lr: float, lr: float):
    """``tuned`` through the trainer at constant learning rates (no warmup, no decay), the gates at
    ``gate_lr``, the rest at ``lr`` (frozen when lr <= 0); AdamW betas 0.9/0.95, no weight decay, clip 1.0,
    fp32, no evaluation, cross-entropy plus the gates' eviction-rate loss; the same batches for the same
    seed with or without gates. The caller's global RNGs are left as they were (the trainer seeds them).
    Returns (tuned in eval mode, history [{step, ce, kept}])."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    ids = {id(p) for p in gates}
    rest = [p for p in tuned.parameters() if id(p) not in ids]
    if lr <= 0:
        for p in rest:
            p.requires_grad_(False)
    groups = ([{"params": gates, "lr": gate_lr, "weight_decay": 0.0}] if gates else []) + (
        [{"params": rest, "lr": lr, "weight_decay": 0.0}] if lr > 0 else []
    )
    if not groups or max(lr, gate_lr) <= 0:
        raise ValueError(
            f"nothing to fine-tune: {len(gates)} gate parameters at gate_lr {gate_lr}, the LM at lr {lr}"
        )
    history = []
    if steps:
        device = next(tuned.parameters()).device
        config = TrainConfig(
            steps=steps, batch_size=batch_size, lr=max(lr, gate_lr), min_lr_ratio=1.0, warmup=0,
            weight_decay=0.0, grad_clip=1.0, eval_every=0, eval_batches=0, seed=seed, device=str(device),
            progress=False, autocast=False,
        )  # fmt: skip
        python_state = random.getstate()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                result = train(tuned, task, config, groups=groups)
        finally:
            random.setstate(python_state)
        history = [{"step": r["step"], "ce": r["loss"], "kept": r.get("kept")} for r in result.history]
    tuned.eval()
    return tuned, history
