"""A lab LM saved as a transformers checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads with no
gatelab installed: a Llama checkpoint (a Qwen3 one with QK-norm). The lab's LM is a Llama-shaped decoder
(pre-norm RMSNorm blocks, SwiGLU MLP, RoPE), so a pattern of plain softmax layers maps onto it weight for
weight; any other mechanism has no transformers equivalent and is refused, naming the layer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def _check_layer(i: int, mixer: nn.Module) -> None:
    c = mixer.config
    problem = None
    if mixer.mechanism != "softmax":
        problem = f"is {mixer.mechanism!r}; only 'softmax' layers map onto Llama/Qwen3 attention"
    elif mixer.cache_policy is not None:
        problem = f"has the KV-cache policy {mixer.cache_policy.name!r}, which transformers cannot run"
    elif not c.causal or not c.rope or c.rope_dims is not None:
        problem = "must be causal with RoPE on every channel"
    elif c.input_bias != c.bias:
        problem = (
            "has biases on q/k/v but not on the output (or the reverse); Llama and Qwen3 bias all or none"
        )
    elif c.qk_norm and c.qk_norm_eps != 1e-6:
        problem = f"has qk_norm_eps {c.qk_norm_eps}; the Qwen3 export shares the blocks' eps 1e-6"
    if problem:
        raise ValueError(f"export_lm: layer {i} {problem}")


def _rms_eps(norm: nn.Module, name: str) -> float:
    if not isinstance(norm, nn.RMSNorm) or norm.eps != 1e-6:
        raise ValueError(f"export_lm: {name} must be an nn.RMSNorm with eps 1e-6, got {norm}")
    return norm.eps


def export_lm(lm: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``lm`` (a ``gatelab.lab.models.LM`` of softmax layers) at ``path`` as a transformers Llama
    checkpoint (Qwen3 where the layers use QK-norm): config.json, model.safetensors, generation_config.json.
    ``AutoModelForCausalLM.from_pretrained(path)`` then gives lm's logits. A non-empty ``path`` is refused
    unless ``overwrite``. Returns the path."""
    if not (hasattr(lm, "blocks") and hasattr(lm, "embed") and hasattr(lm, "config")):
        raise TypeError(f"lm must be a gatelab lab LM (gatelab.lab.models.LM), got {type(lm).__name__}")
    c = lm.config
    for option, supported in (("positions", "rope"), ("norm", "rms"), ("mlp", "swiglu")):
        value = getattr(c, option, supported)
        if value != supported:  # GPT-2-style options: a Llama/Qwen3 checkpoint has no place for them
            raise ValueError(
                f"export_lm: LMConfig.{option}={value!r} has no Llama/Qwen3 equivalent; export supports "
                f"{option}={supported!r} only"
            )
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; choose a new folder or pass overwrite=True")
    if getattr(c, "attention_gate", None) is not None:
        raise ValueError(
            "export_lm: an LM with attention gates (KV-cache eviction) has no transformers equivalent"
        )
    for i, block in enumerate(lm.blocks):
        _check_layer(i, block.mixer)
        _rms_eps(block.mixer_norm, f"layer {i} mixer_norm")
        _rms_eps(block.mlp_norm, f"layer {i} mlp_norm")
    _rms_eps(lm.norm, "the final norm")
    m = lm.blocks[0].mixer.config
    if any(b.mixer.config.to_dict() != m.to_dict() for b in lm.blocks):
        raise ValueError(
            "export_lm: every layer must have the same attention options (one transformers config)"
        )
    hidden = lm.blocks[0].mlp.down.in_features
    options = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=hidden,
                   num_hidden_layers=len(lm.blocks), num_attention_heads=m.n_heads,
                   num_key_value_heads=m.kv_heads, head_dim=m.dim, hidden_act="silu",
                   max_position_embeddings=c.max_seq_len, rms_norm_eps=1e-6,
                   tie_word_embeddings=c.tie_embeddings, attention_bias=m.bias, attention_dropout=0.0,
                   rope_parameters={"rope_type": "default", "rope_theta": m.rope_base})  # fmt: skip
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if m.qk_norm else (LlamaConfig, LlamaForCausalLM)
    if not m.qk_norm:
        options["mlp_bias"] = False
    config = config_cls(**options)
    tensors = {"model.embed_tokens.weight": lm.embed.weight, "model.norm.weight": lm.norm.weight,
               "lm_head.weight": lm.head.weight}  # fmt: skip
    for i, block in enumerate(lm.blocks):
        prefix = f"model.layers.{i}."
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)  # SwiGLU: silu(gate) * up, gate first
        tensors |= {prefix + "input_layernorm.weight": block.mixer_norm.weight,
                    prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
                    prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
                    prefix + "mlp.down_proj.weight": block.mlp.down.weight}  # fmt: skip
        for name, tensor in block.mixer.state_dict().items():
            tensors[prefix + "self_attn." + name] = tensor
    model = model_cls(config).to(dtype=lm.embed.weight.dtype)
    with torch.no_grad():
        model.load_state_dict({k: v.detach() for k, v in tensors.items()}, strict=True)
    model.save_pretrained(path)
    return path


__all__ = ["export_lm"]
