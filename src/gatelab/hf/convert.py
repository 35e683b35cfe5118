"""A gatelab mixer with the same weights as a transformers attention module (Llama, Mistral, Qwen2, Qwen3,
Qwen3-Next / Qwen3.5 gated attention and Gated DeltaNet, GPT-2, BERT). Read from the module's own config and
weights; transformers itself is never imported here (a module is recognised by its class name)."""

from __future__ import annotations

import torch
import torch.nn as nn

from gatelab.registry import make_mixer

# RMSNorms scaling by (1 + weight), weight initialised at 0 (Qwen3-Next, Qwen3.5); gatelab scales by weight
OFFSET_NORMS = ("Qwen3NextRMSNorm", "Qwen3_5RMSNorm")


def _check_dropout(module: nn.Module, config, drop_dropout: bool, *names: str) -> None:
    """The gatelab mixers have no dropout: a module that applies some is refused unless the caller agrees to
    lose it (``drop_dropout=True``), rather than training without it silently."""
    rates = {n: getattr(config, n) for n in names if getattr(config, n, 0.0)}
    if rates and not drop_dropout:
        raise ValueError(
            f"{type(module).__name__}: the gatelab mixer has no dropout, but the config sets {rates}; set "
            "them to 0.0 in the config or pass drop_dropout=True"
        )


def _rope_options(module: nn.Module, head_dim: int) -> dict:
    """rope_base and rope_dims from the config's rope_parameters; only the plain ("default") RoPE."""
    config = module.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(
            f"{type(module).__name__}: RoPE type {rope_type!r} is not supported (only 'default'); its "
            "frequencies or attention scaling have no gatelab option"
        )
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    rope_dims = int(head_dim * factor)
    return {
        "rope_base": float(params["rope_theta"]),
        "rope_dims": None if rope_dims == head_dim else rope_dims,
    }


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    weight = norm.weight.detach()
    return 1.0 + weight if type(norm).__name__ in OFFSET_NORMS else weight


def sliding_window(module: nn.Module) -> int | None:
    """The window of a sliding-window layer (Mistral; Qwen2/3 layers typed "sliding_attention"), else None
    (full attention, or a module without a config: BERT's)."""
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[module.layer_idx] == "sliding_attention" else None
    return window


def _load(mixer: nn.Module, tensors: dict, module: nn.Module) -> nn.Module:
    weight = next(module.parameters())
    mixer.load_state_dict({k: v.detach().float() for k, v in tensors.items()}, strict=True)
    return mixer.to(device=weight.device, dtype=weight.dtype)


def _linear(prefix: str, linear: nn.Module) -> dict:
    out = {f"{prefix}.weight": linear.weight}
    if linear.bias is not None:
        out[f"{prefix}.bias"] = linear.bias
    return out


def _llama_like(module: nn.Module, drop_dropout: bool, options: dict) -> nn.Module:
    """Llama, Mistral, Qwen2, Qwen3 (QK-norm); Qwen3-Next and Qwen3.5 (gate fused per head into q_proj)."""
    config = module.config
    _check_dropout(module, config, drop_dropout, "attention_dropout")
    gated = module.q_proj.out_features == 2 * config.num_attention_heads * module.head_dim
    H, D = config.num_attention_heads, module.head_dim
    built = {"d_model": config.hidden_size, "n_heads": H, "n_kv_heads": config.num_key_value_heads,
             "head_dim": D, "rope": True, **_rope_options(module, D),
             "bias": module.o_proj.bias is not None, "qkv_bias": module.q_proj.bias is not None}  # fmt: skip
    if module.scaling != D**-0.5:
        raise ValueError(
            f"{type(module).__name__}: attention scaling {module.scaling} is not head_dim ** -0.5"
        )
    key = "softmax"
    window = sliding_window(module)
    if gated:  # Qwen3-Next: q_proj emits [q_h | g_h] per query head, o = attn * sigmoid(g) (G1 elementwise)
        key = "gated_softmax"
        built |= {"gate": "elementwise", "fused": "per_head", "gate_fn": "sigmoid"}
    if window is not None:
        if gated:
            raise ValueError(
                f"{type(module).__name__}: a gated sliding-window layer has no gatelab mechanism"
            )
        key = "sliding_window"
        built |= {"window": window, "sinks": 0}  # HF's window: the token and the window - 1 before it
    tensors = {**_linear("q_proj", module.q_proj), **_linear("k_proj", module.k_proj),
               **_linear("v_proj", module.v_proj), **_linear("o_proj", module.o_proj)}  # fmt: skip
    if hasattr(module, "q_norm"):
        built |= {"qk_norm": True, "qk_norm_eps": float(module.q_norm.variance_epsilon
                                                        if hasattr(module.q_norm, "variance_epsilon")
                                                        else module.q_norm.eps)}  # fmt: skip
        tensors |= {
            "q_norm.weight": _norm_weight(module.q_norm),
            "k_norm.weight": _norm_weight(module.k_norm),
        }
    return _load(make_mixer(key, **{**built, **options}), tensors, module)


def _gpt2(module: nn.Module, drop_dropout: bool, options: dict) -> nn.Module:
    """GPT-2: Conv1D layers (y = x W + b, W (in, out): the transpose of nn.Linear's), one fused c_attn."""
    config = module.config
    _check_dropout(module, config, drop_dropout, "attn_pdrop", "resid_pdrop")
    if module.is_cross_attention or config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        raise ValueError(
            "GPT2Attention: cross-attention, scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn are "
            "not supported"
        )
    if not config.scale_attn_weights:
        raise ValueError("GPT2Attention: scale_attn_weights=False (unscaled scores) is not supported")
    d = config.hidden_size
    w, b = module.c_attn.weight.t(), module.c_attn.bias  # (3d, d), (3d,)
    tensors = {"o_proj.weight": module.c_proj.weight.t(), "o_proj.bias": module.c_proj.bias}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        tensors |= {f"{name}.weight": w[i * d : (i + 1) * d], f"{name}.bias": b[i * d : (i + 1) * d]}
    built = {"d_model": d, "n_heads": config.num_attention_heads, "rope": False, "bias": True}
    return _load(make_mixer("softmax", **{**built, **options}), tensors, module)


def _bert(module: nn.Module, drop_dropout: bool, options: dict) -> nn.Module:
    """BERT's BertAttention: self-attention (bidirectional) and output.dense as the output projection; the
    residual add and LayerNorm of BertSelfOutput belong to the block, not to the mixer."""
    config = module.self.config
    _check_dropout(module, config, drop_dropout, "attention_probs_dropout_prob", "hidden_dropout_prob")
    if module.is_cross_attention or module.self.is_causal:
        raise ValueError("BertAttention: only the bidirectional self-attention of an encoder is supported")
    attn = module.self
    tensors = {**_linear("q_proj", attn.query), **_linear("k_proj", attn.key),
               **_linear("v_proj", attn.value), **_linear("o_proj", module.output.dense)}  # fmt: skip
    built = {"d_model": config.hidden_size, "n_heads": config.num_attention_heads, "rope": False,
             "bias": True, "causal": False}  # fmt: skip
    return _load(make_mixer("softmax", **{**built, **options}), tensors, module)


def _deltanet(module: nn.Module, drop_dropout: bool, options: dict) -> nn.Module:
    """Qwen3-Next / Qwen3.5 Gated DeltaNet. With fewer key heads than value heads (grouped), each query/key
    head serves r = value heads / key heads consecutive value heads: its projection rows and conv taps are
    repeated r times, which computes the same function (the conv is depthwise, the L2 norm per head)."""
    if module.activation != "silu":
        raise ValueError(f"{type(module).__name__}: conv activation {module.activation!r} is not supported")
    if module.conv1d.bias is not None:
        raise ValueError(f"{type(module).__name__}: a conv bias is not supported")
    nk, nv, Dk, Dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    r = nv // nk
    d = module.hidden_size
    if hasattr(module, "in_proj_qkvz"):  # Qwen3-Next: per key-head group [q | k | r values | r gates]
        qkvz = module.in_proj_qkvz.weight.view(nk, 2 * Dk + 2 * r * Dv, d)
        q, k, v, z = qkvz.split([Dk, Dk, r * Dv, r * Dv], dim=1)
        ba = module.in_proj_ba.weight.view(nk, 2 * r, d)
        b, a = ba.split([r, r], dim=1)
    else:  # Qwen3.5: [q | k | v] in conv channel order, and separate z, b, a
        q, k, v = module.in_proj_qkv.weight.split([nk * Dk, nk * Dk, nv * Dv], dim=0)
        q, k = q.view(nk, Dk, d), k.view(nk, Dk, d)
        z, b, a = module.in_proj_z.weight, module.in_proj_b.weight, module.in_proj_a.weight
    conv = module.conv1d.weight.squeeze(1)  # (conv_dim, W), channels [q | k | v]
    conv_q, conv_k, conv_v = conv.split([nk * Dk, nk * Dk, nv * Dv], dim=0)
    W = conv.shape[1]
    per_value_head = lambda t: t.reshape(nk, Dk, -1).repeat_interleave(r, dim=0).reshape(nv * Dk, -1)
    tensors = {
        "q_proj.weight": per_value_head(q), "k_proj.weight": per_value_head(k),
        "v_proj.weight": v.reshape(nv * Dv, d), "g_proj.weight": z.reshape(nv * Dv, d),
        "a_proj.weight": a.reshape(nv, d), "b_proj.weight": b.reshape(nv, d),
        "o_proj.weight": module.out_proj.weight,
        "q_conv": per_value_head(conv_q), "k_conv": per_value_head(conv_k), "v_conv": conv_v,
        "A_log": module.A_log, "dt_bias": module.dt_bias, "o_norm_weight": module.norm.weight,
    }  # fmt: skip
    built = {"d_model": d, "n_heads": nv, "head_dim": Dk, "expand_v": Dv / Dk, "conv_size": W,
             "norm_eps": float(module.layer_norm_epsilon)}  # fmt: skip
    return _load(make_mixer("gated_deltanet", **{**built, **options}), tensors, module)


FAMILIES = {
    "LlamaAttention": _llama_like,
    "MistralAttention": _llama_like,
    "Qwen2Attention": _llama_like,
    "Qwen3Attention": _llama_like,
    "Qwen3NextAttention": _llama_like,
    "Qwen3_5Attention": _llama_like,
    "GPT2Attention": _gpt2,
    "BertAttention": _bert,
    "Qwen3NextGatedDeltaNet": _deltanet,
    "Qwen3_5GatedDeltaNet": _deltanet,
}


def from_hf_attention(module: nn.Module, *, drop_dropout: bool = False, **options) -> nn.Module:
    """The gatelab mixer computing what ``module`` (a transformers attention module) computes, with its
    weights copied (in the module's dtype and device): ``mixer(x)[0]`` equals ``module``'s output for
    x (B, T, hidden_size).

    Llama/Mistral/Qwen2/Qwen3 give ``softmax`` (GQA, RoPE, Qwen2's q/k/v biases, Qwen3's QK-norm; a Mistral
    sliding-window layer gives ``sliding_window`` with no sinks), Qwen3-Next/Qwen3.5 attention
    ``gated_softmax`` (G1 elementwise sigmoid gate, q and gate fused per head, partial RoPE), their Gated
    DeltaNet layers ``gated_deltanet``, GPT2Attention ``softmax`` without RoPE, BertAttention a bidirectional
    ``softmax`` (its output dense as o_proj; the residual LayerNorm is the block's). ``options`` override the
    mechanism options read from the module (e.g. ``backend``). A module with dropout is refused unless
    ``drop_dropout`` (the mixers have none); any other module class is a TypeError naming it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a transformers attention nn.Module, got {type(module).__name__}")
    convert = FAMILIES.get(type(module).__name__)
    if convert is None:
        raise TypeError(
            f"from_hf_attention: {type(module).__name__} is not supported; supported attention modules: "
            f"{', '.join(FAMILIES)}"
        )
    with torch.no_grad():
        return convert(module, drop_dropout, options)


__all__ = ["from_hf_attention", "FAMILIES"]
