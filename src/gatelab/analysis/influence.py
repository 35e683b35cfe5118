"""AttentionInfluence (arXiv 2505.07293): score a sample by how much its loss rises when a set of heads
(the retrieval heads) has its attention made uniform: (L_masked - L_base) / L_base (App. C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatelab.mixers._attention import AttentionMixer

from .hooks import Site, hooked, layers_of

IGNORE = -100


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.logits


def _plain_softmax(mixer) -> bool:
    """Whether the head output is exactly attention-weighted values (no gate, no value change, no policy)."""
    kind = type(mixer)
    return (
        isinstance(mixer, AttentionMixer)
        and kind.attend is AttentionMixer.attend
        and kind.prepare_kv is AttentionMixer.prepare_kv
        and mixer.cache_policy is None
        and mixer.config.causal
    )


def uniform_attention(model, run, heads: dict[int, list[int]]):
    """run()'s output with each listed head's attention set to uniform over its visible (causal) prefix, as
    AttentionInfluence masks its heads: 1/L with L the visible length (the paper leaves L open under a
    causal mask; we take the visible length). Its output is then the prefix mean of its values. Only plain
    causal softmax heads (the output is P @ V) are accepted: a gate or a value change would make this
    something else."""
    layers = layers_of(model)
    values: dict[int, torch.Tensor] = {}
    handles = []
    for i in heads:
        mixer = layers.mixers[i]
        if not _plain_softmax(mixer):
            raise TypeError(
                f"layer {i} ({type(mixer).__name__}) is not a plain causal softmax mixer; uniform "
                "attention masking needs the output to be P @ V"
            )
        handles.append(mixer.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out)))

    def edit_for(i: int):
        mixer = layers.mixers[i]
        H, Hkv, D = mixer.config.n_heads, mixer.config.kv_heads, mixer.config.dim
        index = list(heads[i])

        def edit(x):  # x (B, T, H, D)
            v = values[i].unflatten(-1, (Hkv, D)).repeat_interleave(H // Hkv, dim=2)  # (B, T, H, D)
            count = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)[None, :, None, None]
            new = x.clone()
            new[:, :, index] = (v.cumsum(1) / count)[:, :, index].to(x.dtype)
            return new

        return edit

    try:
        with torch.no_grad(), hooked(layers, edits={Site("heads", i): edit_for(i) for i in heads}):
            return run()
    finally:
        for handle in handles:
            handle.remove()


def sample_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy per sample over labelled positions (targets != -100)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    labelled = (targets != IGNORE).sum(1)
    if (labelled == 0).any():
        raise ValueError("every sample needs at least one labelled target (targets != -100)")
    return loss.sum(1) / labelled


def attention_influence(model, idx: torch.Tensor, targets: torch.Tensor, heads: dict[int, list[int]]):
    """(B,) AttentionInfluence = (L_masked - L_base) / L_base per sample, L the mean token cross-entropy
    (arXiv 2505.07293, Sec. 2) and the masked model's ``heads`` uniform (:func:`uniform_attention`).

    idx (B, T) inputs, targets (B, T) next tokens (-100: no label). An empty head set scores 0 exactly."""
    with torch.no_grad():
        base = sample_losses(_logits(model(idx)), targets)
    if not any(heads.values()):
        return torch.zeros_like(base)
    masked = sample_losses(_logits(uniform_attention(model, lambda: model(idx), heads)), targets)
    return (masked - base) / base


__all__ = ["uniform_attention", "sample_losses", "attention_influence"]
