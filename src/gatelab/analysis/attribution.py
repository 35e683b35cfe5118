"""Direct logit attribution of each head, and gate-head finding (How Alignment Routes, arXiv 2604.04385:
a gate head carries little direct logit attribution yet is causally necessary, found by interchange)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .hooks import Site, capture, layers_of


def _readout(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding Linear) of a gatelab LM (``.norm``, ``.head``) or a transformers causal LM
    (``base_model.norm``, ``get_output_embeddings()``)."""
    if hasattr(model, "norm") and hasattr(model, "head"):
        return model.norm, model.head
    if hasattr(model, "get_output_embeddings") and hasattr(getattr(model, "base_model", None), "norm"):
        return model.base_model.norm, model.get_output_embeddings()
    raise TypeError(
        f"{type(model).__name__}: no final norm + unembedding found; DLA needs a gatelab LM or a "
        "transformers causal LM with base_model.norm"
    )


def _linearised_norm(norm: nn.Module, x_final: torch.Tensor):
    """The final norm frozen at the reference stream ``x_final`` (B, d): c -> its linear part. RMSNorm:
    c * gamma / rms(x_final); LayerNorm: (c - mean c) * gamma / std(x_final) (its bias is a term of its
    own)."""
    x = x_final.float()
    weight = norm.weight.float() if getattr(norm, "weight", None) is not None else 1.0
    eps = norm.eps if getattr(norm, "eps", None) is not None else torch.finfo(torch.float32).eps
    if isinstance(norm, nn.LayerNorm):
        scale = weight / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # (B, d)
        return lambda c: (c - c.mean(-1, keepdim=True)) * scale
    if isinstance(norm, nn.RMSNorm) or type(norm).__name__.endswith("RMSNorm"):
        eps = getattr(norm, "variance_epsilon", eps)
        scale = weight / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return lambda c: c * scale
    raise TypeError(f"final norm {type(norm).__name__} is neither an RMSNorm nor a LayerNorm")


@torch.no_grad()
def direct_logit_attribution(model, idx: torch.Tensor, target, other, position=-1) -> dict:
    """Each component's direct effect on ``logit[target] - logit[other]`` at ``position`` (How Alignment
    Routes, DLA: c_h = W_O[:, h-slice] z_h, through the final norm linearised at the actual final stream).

    idx (B, T) token ids; target / other: ints or (B,) ids; position: an int, or (B,) positions (one per
    row). The final residual stream is the embedding plus,
    per layer, each head's c_h, the output projection's bias and the MLP output, so with the norm frozen
    these terms sum to the logit difference exactly (plus the norm's and unembedding's biases, if any).
    Returns {"heads": (B, L, H), "embed": (B,), "bias": (B, L), "mlp": (B, L) (NaN without an MLP
    module), "other": (B,) (norm / unembedding biases), "total": (B,) the model's logit difference}.
    """
    layers = layers_of(model)
    model = layers.model
    norm, unembed = _readout(model)
    L = len(layers)
    has_mlp = all(isinstance(getattr(b, "mlp", None), nn.Module) for b in layers.blocks)
    sites = [Site("heads", i) for i in range(L)] + [Site("resid", 0), Site("resid", L)]
    sites += [Site("mlp", i) for i in range(L)] if has_mlp else []
    out, cache = capture(layers, lambda: model(idx), sites)
    B = idx.shape[0]
    rows = torch.arange(B)
    if isinstance(position, int):
        position = torch.full((B,), position)
    position = torch.as_tensor(position)
    if position.shape != (B,):
        raise ValueError(f"position must be an int or (B={B},) positions, got shape {tuple(position.shape)}")

    def at(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, ...) at each row's position
        return t[rows, position]

    logits = at(out[0] if isinstance(out, tuple) else out.logits).float()  # (B, vocab)
    target, other = (torch.as_tensor(t).expand(B) for t in (target, other))
    total = logits[rows, target] - logits[rows, other]
    W_U = unembed.weight.float()
    direction = W_U[target] - W_U[other]  # (B, d)
    frozen = _linearised_norm(norm, at(cache[Site("resid", L)]))

    def project(c: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B,)
        return (frozen(c.float()) * direction).sum(-1)

    heads = torch.full((B, L, max(layers.n_heads)), float("nan"))
    bias = torch.zeros(B, L)
    mlp = torch.full((B, L), float("nan"))
    for i, mixer in enumerate(layers.mixers):
        z = at(cache[Site("heads", i)]).float()  # (B, H, Dv)
        W_O = mixer.o_proj.weight.float().unflatten(1, (layers.n_heads[i], -1))  # (d, H, Dv)
        heads[:, i, : layers.n_heads[i]] = torch.stack(
            [project(z[:, h] @ W_O[:, h].T) for h in range(layers.n_heads[i])], dim=1
        )
        if mixer.o_proj.bias is not None:
            bias[:, i] = project(mixer.o_proj.bias.float().expand(B, -1))
        if has_mlp:
            mlp[:, i] = project(at(cache[Site("mlp", i)]))
    embed = project(at(cache[Site("resid", 0)]))
    rest = torch.zeros(B)
    if getattr(norm, "bias", None) is not None:
        rest += (norm.bias.float() * direction).sum(-1)
    if getattr(unembed, "bias", None) is not None:
        rest += unembed.bias.float()[target] - unembed.bias.float()[other]
    return {"heads": heads, "embed": embed, "bias": bias, "mlp": mlp, "other": rest, "total": total}


def gate_values(model, run) -> torch.Tensor:
    """(L, H) mean activated gate value per head over a run (NaN for a layer without a per-head gate).

    A gate of shape (B, T, H) or (B, T, H, D) (headwise or elementwise) is averaged over all but the head
    axis; layers whose mixer gives no "gate" internals stay NaN."""
    layers = layers_of(model)
    result = torch.full((len(layers), max(layers.n_heads)), float("nan"))
    for i, H in enumerate(layers.n_heads):
        try:
            _, cache = capture(layers, run, [Site("gate", i)])
        except TypeError:  # this mixer has no gate
            continue
        gate = cache[Site("gate", i)].float()
        if gate.ndim < 3 or gate.shape[2] != H:
            continue  # not a per-head gate (e.g. one per layer): no per-head value to report
        result[i, :H] = gate.transpose(0, 2).reshape(H, -1).mean(-1)
    return result


def find_gate_heads(
    effect: torch.Tensor, dla: torch.Tensor, total: float, effect_share: float = 0.5, dla_share: float = 0.1
) -> list[dict]:
    """Heads whose causal effect is large while their direct logit attribution is small (How Alignment
    Routes: the gate head carries < 1% of the output DLA yet is necessary).

    effect (L, H): per-head interchange (or ablation) effect on the metric, e.g.
    ``activation_patching(...)["patched"] - corrupt``; dla (L, H): DLA of each head on the same metric
    (mean over the batch); total: the metric's size (e.g. the clean logit difference). A head is a gate head
    when |effect| >= effect_share * max |effect| and |dla| <= dla_share * |total| (our thresholds: the paper
    reports the shares, not a rule). Returns dicts (layer, head, effect, dla), largest effect first.
    """
    if effect.shape != dla.shape or effect.ndim != 2:
        raise ValueError(
            f"effect and dla must be (L, H) of one shape, got {tuple(effect.shape)} and {tuple(dla.shape)}"
        )
    for name, share in (("effect_share", effect_share), ("dla_share", dla_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    size = effect.abs().nan_to_num(0).max()
    found = [
        {"layer": i, "head": h, "effect": float(effect[i, h]), "dla": float(dla[i, h])}
        for i in range(effect.shape[0])
        for h in range(effect.shape[1])
        if size > 0 and abs(effect[i, h]) >= effect_share * size and abs(dla[i, h]) <= dla_share * abs(total)
    ]
    return sorted(found, key=lambda row: -abs(row["effect"]))


__all__ = ["direct_logit_attribution", "gate_values", "find_gate_heads"]
