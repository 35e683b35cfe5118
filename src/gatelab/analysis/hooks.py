"""Hooks over the gatelab mixers of a model (a gatelab LM, or a transformers model patched by gatelab.hf):
read, replace or ablate per-head outputs (the input of each mixer's output projection), attention
probabilities and gate values (the mixer's internals), and the residual stream, for the forward passes
inside a ``with`` block. Nothing in the model's code changes: the hooks are torch forward hooks, removed
on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.mixers._attention import AttentionMixer
from gatelab.mixers._base import Mixer

KINDS = ("heads", "attn", "gate", "resid", "mlp")
EDITABLE = ("heads", "resid", "mlp")


@dataclass(frozen=True)
class Site:
    """One place in a forward pass.

    ``heads``: per-head outputs before the output projection (B, T, H, Dv) of layer ``layer``.
    ``attn``: attention probabilities (B, H, T, S), or a linear mixer's equivalent T x T matrix (read only).
    ``gate``: the mixer's activated gate values, as its internals give them (read only).
    ``resid``: the residual stream entering block ``layer`` (B, T, d_model); ``layer == n_layers`` is the
    stream after the last block. ``mlp``: the MLP output of block ``layer`` (B, T, d_model).
    """

    kind: str
    layer: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Site kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"Site layer must be an int >= 0, got {self.layer!r}")


class ModelLayers:
    """The gatelab mixers of ``model`` in forward order, the block (a ModuleList element) holding each,
    and the head layout of each mixer's output projection."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, Mixer) and hasattr(m, "o_proj")]
        if not named:
            raise ValueError(
                f"{type(model).__name__} holds no gatelab mixer with an output projection; analyse a gatelab "
                "LM or a transformers model patched with gatelab.hf.patch"
            )
        self.model = model
        self.names = [n for n, _ in named]
        self.mixers = [m for _, m in named]
        self.blocks = [self._block_of(n) for n in self.names]
        self.n_heads = [m.config.n_heads for m in self.mixers]
        self.head_dims = [m.o_proj.in_features // h for m, h in zip(self.mixers, self.n_heads)]

    def _block_of(self, name: str) -> nn.Module:
        """The nearest ancestor of the mixer ``name`` that is an element of a ModuleList (a decoder layer)."""
        modules = dict(self.model.named_modules())
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = modules[".".join(parts[: cut - 1])] if cut > 1 else self.model
            if isinstance(parent, nn.ModuleList):
                return modules[".".join(parts[:cut])]
        raise ValueError(f"mixer {name!r} sits in no ModuleList of blocks; the residual stream is unknown")

    def __len__(self) -> int:
        return len(self.mixers)

    def check(self, site: Site) -> None:
        top = len(self) if site.kind == "resid" else len(self) - 1
        if site.layer > top:
            raise ValueError(f"{site} is past the model's {len(self)} layers (layer must be <= {top})")
        if site.kind == "mlp" and not isinstance(getattr(self.blocks[site.layer], "mlp", None), nn.Module):
            raise ValueError(f"{site}: block {site.layer} has no .mlp module")


Edit = Callable[[torch.Tensor], torch.Tensor]


def layers_of(model) -> ModelLayers:
    """The layout of ``model`` (a model, or a ModelLayers already made for it)."""
    return model if isinstance(model, ModelLayers) else ModelLayers(model)


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_first(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _checked(site: Site, old: torch.Tensor, new) -> torch.Tensor:
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"the edit of {site} must return a tensor of shape {tuple(old.shape)}, got {got}")
    return new.to(old.dtype)


@contextlib.contextmanager
def hooked(
    model: nn.Module, read=(), edits: dict[Site, Edit] | None = None
) -> Iterator[dict[Site, list[torch.Tensor]]]:
    """Within the ``with``, every forward pass of ``model`` records the ``read`` sites and applies ``edits``.

    Yields a dict Site -> list of tensors (one per forward pass, detached; a read site that is also edited
    records the edited value). An edit is a function of the site's tensor returning a tensor of the same
    shape (``heads``: (B, T, H, Dv)); ``attn`` and ``gate`` are read only.
    """
    layers = layers_of(model)
    edits = dict(edits or {})
    read = tuple(read)
    for site in (*read, *edits):
        if not isinstance(site, Site):
            raise TypeError(f"sites must be gatelab.analysis.Site, got {type(site).__name__}")
        layers.check(site)
    for site in edits:
        if site.kind not in EDITABLE:
            raise ValueError(f"{site} is read only; editable kinds: {EDITABLE}")
        if not callable(edits[site]):
            raise TypeError(f"the edit of {site} must be callable, got {type(edits[site]).__name__}")
    records: dict[Site, list[torch.Tensor]] = {s: [] for s in read}
    handles = []

    def apply(site: Site, value: torch.Tensor) -> torch.Tensor:
        if site in edits:
            value = _checked(site, value, edits[site](value))
        if site in records:
            records[site].append(value.detach().clone())
        return value

    by_kind = {kind: {s.layer for s in (*read, *edits) if s.kind == kind} for kind in KINDS}
    for i, mixer in enumerate(layers.mixers):
        H = layers.n_heads[i]
        if i in by_kind["heads"]:

            def heads_hook(module, args, i=i, H=H):
                x = args[0]  # (B, T, H * Dv)
                new = apply(Site("heads", i), x.unflatten(-1, (H, -1)))  # (B, T, H, Dv)
                return (new.flatten(-2), *args[1:])

            handles.append(mixer.o_proj.register_forward_pre_hook(heads_hook))
        if i in by_kind["attn"] | by_kind["gate"]:
            handles += _internals_hooks(mixer, i, records)
        block = layers.blocks[i]
        if i in by_kind["resid"]:

            def resid_hook(module, args, kwargs, i=i):
                x = _first(args, kwargs)
                return _with_first(args, kwargs, apply(Site("resid", i), x))

            handles.append(block.register_forward_pre_hook(resid_hook, with_kwargs=True))
        if i in by_kind["mlp"]:
            handles.append(block.mlp.register_forward_hook(lambda m, a, out, i=i: apply(Site("mlp", i), out)))
    last = len(layers)
    if last in by_kind["resid"]:

        def final_hook(module, args, out):
            if isinstance(out, tuple):
                return (apply(Site("resid", last), out[0]), *out[1:])
            return apply(Site("resid", last), out)

        handles.append(layers.blocks[-1].register_forward_hook(final_hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _internals_hooks(mixer: Mixer, i: int, records: dict) -> list:
    """Ask the mixer for its internals on every call and hand the caller what it asked for."""
    asked: list[bool] = []

    def pre(module, args, kwargs):
        asked.append(bool(kwargs.get("return_internals", False)))
        return args, {**kwargs, "return_internals": True}

    def post(module, args, kwargs, out):
        internals = out[2]
        for kind in ("attn", "gate"):
            site = Site(kind, i)
            if site in records:
                if kind not in internals:
                    raise TypeError(f"{type(module).__name__} (layer {i}) gives no {kind!r} internals")
                records[site].append(internals[kind].detach().clone())
        return out if asked.pop() else out[:2]

    return [
        mixer.register_forward_pre_hook(pre, with_kwargs=True),
        mixer.register_forward_hook(post, with_kwargs=True),
    ]


def capture(model, run: Callable[[], object], sites, edits=None) -> tuple[object, dict[Site, torch.Tensor]]:
    """(run()'s result, Site -> tensor) for one forward pass ``run`` (e.g. ``lambda: lm(idx)``) with
    ``edits`` applied (a read site that is edited records the edited value), no grad."""
    with torch.no_grad(), hooked(model, read=sites, edits=edits) as records:
        out = run()
    return out, {s: _one(s, v) for s, v in records.items()}


def run_with(model, run: Callable[[], object], edits: dict[Site, Edit]):
    """run()'s result with ``edits`` applied, no grad."""
    with torch.no_grad(), hooked(model, edits=edits):
        return run()


def _one(site: Site, values: list[torch.Tensor]) -> torch.Tensor:
    if len(values) != 1:
        raise ValueError(f"{site} was reached {len(values)} times in run(); one forward pass expected")
    return values[0]


def plain_softmax(mixer) -> bool:
    """Whether a mixer's head output is exactly its attention times its values: a causal softmax-family
    mixer with the base attend (no gate, no clipping, no window), no value change and no cache policy."""
    kind = type(mixer)
    return (
        isinstance(mixer, AttentionMixer)
        and kind.attend is AttentionMixer.attend
        and kind.prepare_kv is AttentionMixer.prepare_kv
        and mixer.cache_policy is None
        and mixer.config.causal
    )


def replace_attention(model, run: Callable[[], object], maps: dict) -> object:
    """run()'s output (no grad) with the attention of some heads replaced: ``maps`` is layer -> (heads,
    probs), probs (..., len(heads), T, T) broadcastable to (B, len(heads), T, T), or a function of T giving
    it; each listed head outputs probs @ its values. Only plain causal softmax layers (:func:`plain_softmax`)
    are accepted: there the head output is P @ V, so a replaced P is all it takes."""
    layers = layers_of(model)
    values: dict[int, torch.Tensor] = {}
    handles = []
    for i in maps:
        layers.check(Site("heads", i))
        mixer = layers.mixers[i]
        if not plain_softmax(mixer):
            raise TypeError(
                f"layer {i} ({type(mixer).__name__}) is not a plain causal softmax mixer; replacing "
                "its attention needs its output to be P @ V"
            )
        handles.append(mixer.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out)))

    def edit_for(i: int):
        config = layers.mixers[i].config
        index, probs = list(maps[i][0]), maps[i][1]
        _head_index(index, config.n_heads)

        def edit(x):  # x (B, T, H, D)
            B, T = x.shape[:2]
            v = values[i].unflatten(-1, (config.kv_heads, config.dim))  # (B, T, Hkv, D)
            v = v.repeat_interleave(config.n_heads // config.kv_heads, dim=2)[:, :, index]  # (B, T, h, D)
            p = probs(T) if callable(probs) else probs
            p = torch.broadcast_to(p.to(v), (B, len(index), T, T))
            new = x.clone()
            new[:, :, index] = torch.einsum("bhts,bshd->bthd", p, v).to(x.dtype)
            return new

        return edit

    try:
        with torch.no_grad(), hooked(layers, edits={Site("heads", i): edit_for(i) for i in maps}):
            return run()
    finally:
        for handle in handles:
            handle.remove()


# Edits ---------------------------------------------------------------------------------------------------


def _head_index(heads, H: int) -> list[int]:
    heads = list(range(H)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in heads if not isinstance(h, int) or not 0 <= h < H]
    if bad:
        raise ValueError(f"heads must be in [0, {H}), got {bad}")
    return heads


def zero_heads(heads=None, positions=None) -> Edit:
    """Edit of a ``heads`` site: set the given heads (all if None) at ``positions`` (all if None) to zero."""
    return replace_heads(None, heads, positions)


def replace_heads(source: torch.Tensor | None, heads=None, positions=None) -> Edit:
    """Edit of a ``heads`` site (B, T, H, Dv): take the given heads at ``positions`` from ``source``, a tensor
    broadcastable to the site (None: zeros). Positions index the time axis (an int, a list, a slice)."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        index = _head_index(heads, x.shape[2])
        pos = slice(None) if positions is None else positions
        new = x.clone()
        if source is None:
            new[:, pos, index] = 0
        else:
            full = torch.broadcast_to(source.to(x.dtype), x.shape)
            new[:, pos, index] = full[:, pos, index]
        return new

    return edit


def mean_heads(reference: torch.Tensor, heads=None, positions=None) -> Edit:
    """Mean ablation: the given heads take their mean output over a reference set, ``reference`` the
    ``heads`` site recorded on it (B, T, H, Dv), averaged over batch and positions (one vector per head:
    our choice, so that prompts of any length can be ablated)."""
    return replace_heads(reference.mean(dim=(0, 1), keepdim=True), heads, positions)


def replace_all(source: torch.Tensor) -> Edit:
    """Edit of any site: the whole tensor from ``source`` (same shape)."""
    return lambda x: source


__all__ = [
    "Site",
    "ModelLayers",
    "layers_of",
    "hooked",
    "capture",
    "run_with",
    "zero_heads",
    "replace_heads",
    "mean_heads",
    "replace_all",
    "plain_softmax",
    "replace_attention",
]
