"""Ablation and patching of heads on a metric: zero / mean head ablation (Thinking Sparks!, arXiv
2509.25758, validates its heads by zeroing them), activation patching between a clean and a corrupted
prompt per head, per layer and per position (the interchange of How Alignment Routes, arXiv 2604.04385),
and path patching sender -> receivers (Interpretability in the Wild, arXiv 2211.00593, as used by Circuit
Component Reuse Across Tasks, arXiv 2310.08744)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hooks import (
    ModelLayers,
    Site,
    capture,
    layers_of,
    mean_heads,
    replace_all,
    replace_heads,
    run_with,
    zero_heads,
)

Metric = Callable[[object], float | torch.Tensor]  # the run's output -> a number (e.g. a logit difference)


def _value(metric: Metric, out) -> float:
    value = metric(out)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric must return a number or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        value = value.item()
    return float(value)


def _grid(layers: ModelLayers) -> torch.Tensor:
    """(L, max H) filled with NaN: heads a layer does not have stay NaN."""
    return torch.full((len(layers), max(layers.n_heads)), float("nan"))


def ablation_scores(model, run, metric: Metric, mode: str = "zero", reference=None, positions=None) -> dict:
    """Ablate each head alone and score ``metric(ablated) - metric(clean)``.

    run: () -> the model's output for one forward pass (e.g. ``lambda: lm(idx)``). mode ``"zero"`` sets
    the head's output before the output projection to 0; ``"mean"`` sets it to its mean over a reference set
    (``reference``: a run of the reference prompts; the mean is over batch and positions). Returns {"clean":
    float, "scores": (L, H) tensor}.
    """
    layers = layers_of(model)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean":
        if reference is None:
            raise ValueError("mode='mean' needs reference: a run of the reference prompts")
        _, ref = capture(layers, reference, [Site("heads", i) for i in range(len(layers))])
    clean = _value(metric, run_with(layers, run, {}))
    scores = _grid(layers)
    for i, H in enumerate(layers.n_heads):
        for h in range(H):
            edit = (
                zero_heads(h, positions)
                if mode == "zero"
                else mean_heads(ref[Site("heads", i)], h, positions)
            )
            scores[i, h] = _value(metric, run_with(layers, run, {Site("heads", i): edit})) - clean
    return {"clean": clean, "scores": scores}


def ablate(model, run, heads: dict[int, list[int]], mode: str = "zero", reference=None):
    """run()'s output with several heads ablated at once: ``heads`` maps a layer to its head indices."""
    layers = layers_of(model)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    ref = {}
    if mode == "mean":
        if reference is None:
            raise ValueError("mode='mean' needs reference: a run of the reference prompts")
        _, ref = capture(layers, reference, [Site("heads", i) for i in heads])
    edits = {
        Site("heads", i): zero_heads(list(h))
        if mode == "zero"
        else mean_heads(ref[Site("heads", i)], list(h))
        for i, h in heads.items()
    }
    return run_with(layers, run, edits)


def activation_patching(model, clean, corrupt, metric: Metric, per: str = "head") -> dict:
    """Patch clean activations into the corrupted run, one place at a time, and read the metric.

    ``per="head"``: head h of layer l takes its clean output at every position -> (L, H).
    ``per="layer"``: every head of layer l (the mixer's output) -> (L,).
    ``per="position"``: the residual stream entering layer l (l = L: after the last block) at position t
    -> (L + 1, T).
    clean / corrupt: () -> output of one forward pass over prompts of the same shape. Returns {"clean",
    "corrupt": floats, "patched": tensor, "normalized": (patched - corrupt) / (clean - corrupt)} (1 =
    the patch restores the clean metric, 0 = no effect; NaN where clean == corrupt).
    """
    layers = layers_of(model)
    if per not in ("head", "layer", "position"):
        raise ValueError(f"per must be 'head', 'layer' or 'position', got {per!r}")
    kind = "resid" if per == "position" else "heads"
    sites = [Site(kind, i) for i in range(len(layers) + (kind == "resid"))]
    clean_out, cache = capture(layers, clean, sites)
    corrupt_out, other = capture(layers, corrupt, sites)
    for site in sites:
        if cache[site].shape != other[site].shape:
            raise ValueError(
                f"clean and corrupt runs differ in shape at {site}: {tuple(cache[site].shape)} vs "
                f"{tuple(other[site].shape)}; patch prompts of the same length"
            )
    m_clean, m_corrupt = _value(metric, clean_out), _value(metric, corrupt_out)

    def patched(edits) -> float:
        return _value(metric, run_with(layers, corrupt, edits))

    if per == "head":
        result = _grid(layers)
        for i, H in enumerate(layers.n_heads):
            for h in range(H):
                result[i, h] = patched({Site("heads", i): replace_heads(cache[Site("heads", i)], h)})
    elif per == "layer":
        result = torch.tensor([patched({s: replace_all(cache[s])}) for s in sites])
    else:
        T = cache[sites[0]].shape[1]
        result = torch.tensor(
            [[patched({s: _replace_position(cache[s], t)}) for t in range(T)] for s in sites]
        )
    span = m_clean - m_corrupt
    normalized = (result - m_corrupt) / span if span != 0 else torch.full_like(result, float("nan"))
    return {"clean": m_clean, "corrupt": m_corrupt, "patched": result, "normalized": normalized}


def _replace_position(source: torch.Tensor, t: int):
    def edit(x):
        new = x.clone()
        new[:, t] = source[:, t]
        return new

    return edit


def path_patching(model, clean, corrupt, metric: Metric, sender: tuple[int, int], receivers=None) -> dict:
    """Path patching sender -> receivers (Interpretability in the Wild, Sec. 3.1 and App. B).

    1. Cache every head's output on the clean and the corrupted run.
    2. Run the clean prompt with the sender head (layer, head) given its corrupted output and every other
       head frozen to its clean output (MLPs and the receivers are recomputed), and record the receivers.
    3. Run the clean prompt with only the receivers given what they computed in 2; read the metric.
    receivers: a list of (layer, head) after the sender's layer, or None: the logits (the effect of the
    path sender -> output through no other head, read from step 2). Returns {"clean": metric of the clean
    run, "patched": metric after the patch, "effect": patched - clean}.
    """
    layers = layers_of(model)
    s_layer, s_head = sender
    if not 0 <= s_layer < len(layers) or not 0 <= s_head < layers.n_heads[s_layer]:
        raise ValueError(f"sender must be (layer, head) of this model, got {sender}")
    receivers = [] if receivers is None else [tuple(r) for r in receivers]
    for r_layer, r_head in receivers:
        if not s_layer < r_layer < len(layers) or not 0 <= r_head < layers.n_heads[r_layer]:
            raise ValueError(
                f"receiver {(r_layer, r_head)} must be a (layer, head) after the sender's layer {s_layer}"
            )
    sites = [Site("heads", i) for i in range(len(layers))]
    clean_out, cache = capture(layers, clean, sites)
    _, other = capture(layers, corrupt, sites)
    free = {(r_layer, r_head) for r_layer, r_head in receivers}

    def frozen_edit(i: int):
        def edit(x):
            new = cache[Site("heads", i)].clone()  # every head frozen to its clean output ...
            for h in range(x.shape[2]):
                if (i, h) in free:
                    new[:, :, h] = x[:, :, h]  # ... but the receivers, recomputed
            if i == s_layer:
                new[:, :, s_head] = other[Site("heads", i)][:, :, s_head]
            return new

        return edit

    edits = {site: frozen_edit(site.layer) for site in sites}
    step2_out, step2 = capture(layers, clean, sites, edits)
    m_clean = _value(metric, clean_out)
    if not receivers:
        m_patched = _value(metric, step2_out)
    else:
        by_layer: dict[int, list[int]] = {}
        for r_layer, r_head in receivers:
            by_layer.setdefault(r_layer, []).append(r_head)
        final = {Site("heads", i): replace_heads(step2[Site("heads", i)], hs) for i, hs in by_layer.items()}
        m_patched = _value(metric, run_with(layers, clean, final))
    return {"clean": m_clean, "patched": m_patched, "effect": m_patched - m_clean}


__all__ = ["ablation_scores", "ablate", "activation_patching", "path_patching"]
