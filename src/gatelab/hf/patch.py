"""Replace every attention layer of a transformers causal LM with a gatelab mechanism, keeping the
pretrained weights: the model stays a transformers model (``generate()``, ``save_pretrained()``, any torch
training loop), and a gate added with ``init="pass_through"`` leaves its logits unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from gatelab.cache.apply import make_policy
from gatelab.registry import get, make_mixer

from .adapter import HFAttention
from .convert import from_hf_attention, sliding_window

CAUSAL_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                    "Qwen3NextAttention", "Qwen3_5Attention", "GPT2Attention")  # fmt: skip
CONFIG_KEY = "gatelab_patch"  # the config entry that records how a model was patched (saved with it)


def _open_sigmoid_gate(mixer: nn.Module) -> None:
    """A sigmoid gate with zero weights is 0.5 everywhere; the output projection doubled makes the layer
    exactly its softmax original (halving and doubling are exact in floating point), while the gate still
    learns (sigmoid'(0) = 1/4, far from saturation)."""
    c = mixer.config
    if c.gate_fn != "sigmoid" or c.combine != "multiply" or c.fused:
        raise ValueError(
            "gated_softmax: a pass-through init needs gate_fn='sigmoid', combine='multiply' and a separate "
            f"gate projection (fused=None), got gate_fn={c.gate_fn!r}, combine={c.combine!r}, "
            f"fused={c.fused!r}; pass init='random' for the mechanism's own init"
        )
    gate = mixer.gate_proj.parameters() if hasattr(mixer, "gate_proj") else [mixer.gate_logits]
    for p in gate:
        p.zero_()
    mixer.o_proj.weight.mul_(2.0)


def _open_head_gates(mixer: nn.Module) -> None:
    """Gated heads with zero weights and biases gate every head at 0.5; the output projection doubled."""
    last = ("gate_w2", "gate_b2") if mixer.config.mlp_hidden else ("gate_w1", "gate_b1")
    for name in last:
        getattr(mixer, name).zero_()
    mixer.o_proj.weight.mul_(2.0)


PASS_THROUGH = {"gated_softmax": _open_sigmoid_gate, "gated_heads": _open_head_gates}


def convert_mixer(base: nn.Module, key: str, init: str = "pass_through", **options) -> nn.Module:
    """A mixer of mechanism ``key`` holding ``base``'s weights (projections, QK-norm) and ``base``'s options
    (heads, RoPE, biases) with ``options`` on top; the parameters ``base`` lacks (a gate) start as
    ``init``: "pass_through" (the layer computes ``base``'s function) or "random" (the mechanism's init)."""
    if init not in ("pass_through", "random"):
        raise ValueError(f"init must be 'pass_through' or 'random', got {init!r}")
    spec = get(key)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    kept = {k: v for k, v in base.config.to_dict().items() if k in names}
    default = base.config_cls()
    dropped = {k: v for k, v in base.config.to_dict().items() if k not in names and getattr(default, k) != v}
    if dropped:
        raise ValueError(
            f"patch: the layer is {base.mechanism} with {dropped}, which mechanism {key!r} has no option "
            "for; patching it would change what the layer computes"
        )
    mixer = make_mixer(key, **{**kept, **options}).to(next(base.parameters()))
    try:
        missing, unexpected = mixer.load_state_dict(base.state_dict(), strict=False)
    except RuntimeError as error:  # a size mismatch, e.g. a gate fused into q_proj
        raise ValueError(f"patch: {key!r} with {options} cannot hold the layer's weights: {error}") from None
    if unexpected:
        raise ValueError(f"patch: {key!r} has no place for the layer's weights {unexpected}")
    if missing and init == "pass_through":
        if key not in PASS_THROUGH:
            raise ValueError(
                f"patch: {key!r} adds parameters {missing} with no pass-through init (known for "
                f"{', '.join(PASS_THROUGH)}); pass init='random' for the mechanism's own init"
            )
        with torch.no_grad():
            PASS_THROUGH[key](mixer)
    return mixer


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every supported causal attention module of ``model``."""
    found, other = [], set()
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = type(child).__name__
            if kind in CAUSAL_ATTENTION:
                found.append((parent, name, child))
            elif kind.endswith("Attention") and kind != "HFAttention":  # OPT, Falcon, BERT, ... attention
                other.add(kind)
    if other or not found:
        raise TypeError(
            f"patch: {type(model).__name__} has attention modules {sorted(other) or 'none'} that patch does "
            f"not support; patch takes transformers causal LMs with {', '.join(CAUSAL_ATTENTION)} (an "
            "encoder such as BERT: use from_hf_attention on its layers)"
        )
    return found


def patch(
    model: nn.Module,
    key: str,
    *,
    init: str = "pass_through",
    cache_policy: str | None = None,
    policy_options: dict | None = None,
    drop_dropout: bool = False,
    **options,
) -> nn.Module:
    """Replace every attention layer of ``model`` (a transformers causal LM) in place with gatelab mechanism
    ``key`` (softmax family: softmax, gated_softmax, gated_heads, clipped_softmax, sliding_window, ...)
    holding the pretrained weights; ``options`` are the mechanism's options (e.g. ``window=64, sinks=4``), and
    ``cache_policy`` (+ ``policy_options``) plugs a gatelab KV-cache policy ("streaming", "h2o",
    "attention_gate") into every layer. New parameters start as ``init`` ("pass_through": a gate that leaves
    the logits unchanged; "random"). Gated DeltaNet layers of a hybrid keep transformers' own module.

    The patch is recorded in ``model.config.gatelab_patch``, so ``save_pretrained`` writes it and
    :func:`load_patched` rebuilds the model. Returns ``model``.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError(
            f"model is already patched ({getattr(model.config, CONFIG_KEY)}); patch the original"
        )
    record = {"key": key, "init": init, "cache_policy": cache_policy, "policy_options": policy_options or {},
              "drop_dropout": drop_dropout, "options": options}  # fmt: skip
    for parent, name, module in _attention_modules(model):
        base = from_hf_attention(module, drop_dropout=drop_dropout)
        mixer = convert_mixer(base, key, init, **options)
        if cache_policy is not None:
            mixer.set_cache_policy(
                make_policy(cache_policy, mixer, **(policy_options or {})).to(mixer.o_proj.weight)
            )
        mixer.train(module.training)
        setattr(parent, name, HFAttention(mixer, module.layer_idx, sliding_window(module)))
    setattr(model.config, CONFIG_KEY, record)
    return model


def load_patched(path: str | Path, **model_options):
    """A model saved with ``save_pretrained`` after :func:`patch`: the transformers model built from its
    config, patched as recorded in ``config.gatelab_patch``, then its saved weights loaded (strict: every
    weight must find its place, except the output head tied to the embeddings). ``model_options`` go to
    ``AutoModelForCausalLM.from_config`` (e.g. ``dtype``, ``attn_implementation``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():  # a local folder only: never a hub name to download
        raise ValueError(f"{str(path)!r} is not a saved checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(f"{path} holds no gatelab patch (config.{CONFIG_KEY}); load it with from_pretrained")
    delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, **model_options)
    patch(model, record["key"], init="random", cache_policy=record["cache_policy"],
          policy_options=record["policy_options"], drop_dropout=record["drop_dropout"],
          **record["options"])  # fmt: skip
    model.config.gatelab_patch["init"] = record["init"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    )
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path}: weights do not match the patched model: missing {missing}, unexpected {unexpected}"
        )
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


__all__ = ["patch", "load_patched", "convert_mixer", "CAUSAL_ATTENTION"]
