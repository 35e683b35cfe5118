"""W8A8 fake quantisation: the eval loss after rounding every linear layer's weights and input
activations to per-tensor symmetric int8, and its increase over fp32 (the test Quantizable Transformers,
Bondarenko et al., 2023, apply to outlier-prone models)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127  # symmetric int8: [-127, 127], so that 0 is exact and the range is sign-symmetric


def fake_quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 fake quantisation: round(x / s).clamp(-127, 127) * s, s = max|x| / 127.

    Args:
        x: any shape, floating point.
    Returns:
        same shape and dtype as x, holding at most 255 distinct values. An all-zero x is returned as is.
    """
    scale = x.detach().abs().amax().float() / QMAX
    if scale == 0:
        return x
    return (torch.round(x.float() / scale).clamp(-QMAX, QMAX) * scale).to(x.dtype)


@contextmanager
def w8a8(model: nn.Module, keep_fp: Iterable[nn.Module] = ()) -> Iterator[nn.Module]:
    """Inside the block, every ``nn.Linear`` of ``model`` runs with int8 fake-quantised weights and
    int8 fake-quantised inputs (per-tensor, the activation scale is the input's own max |x| at each call).
    ``keep_fp``: modules left in full precision (Quantizable Transformers leave the final linear layer,
    the LM head, in FP). On exit the original weights are restored exactly and the hooks removed, even on
    error."""
    kept = {id(m) for m in keep_fp}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in kept]
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for m in linears:  # a weight shared by several modules (tied head) is saved and quantised once
        saved.setdefault(id(m.weight), (m.weight, m.weight.detach().clone()))
    hooks = []
    try:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(fake_quantize_int8(original))
        for m in linears:
            hooks.append(
                m.register_forward_pre_hook(lambda _m, args: (fake_quantize_int8(args[0]), *args[1:]))
            )
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


@torch.no_grad()
def lm_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy of ``model`` over ``batches``.

    Args:
        model: maps idx (B, T) long to (logits (B, T, V), states).
        batches: list of (inputs (B, T) long, targets (B, T) long with -100 = ignored).
    Returns:
        the mean loss over every labelled target position of every batch (nats).
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for inputs, targets in batches:
        logits = model(inputs.to(device))[0]
        targets = targets.to(device)
        total += float(
            F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("batches hold no labelled target positions (all -100)")
    return total / count


def w8a8_loss(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], keep_fp: Iterable[nn.Module] = ()
) -> dict[str, float]:
    """{"loss_fp32", "loss_w8a8", "w8a8_gap" = loss_w8a8 - loss_fp32} on the same batches (``keep_fp``:
    as :func:`w8a8`)."""
    was_training = model.training
    model.eval()
    try:
        base = lm_loss(model, batches)
        with w8a8(model, keep_fp):
            quantised = lm_loss(model, batches)
    finally:
        model.train(was_training)
    return {"loss_fp32": base, "loss_w8a8": quantised, "w8a8_gap": quantised - base}
