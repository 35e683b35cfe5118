"""Small randomly initialised transformers attention modules of every family the bridge supports (no
download), each with the call that gives its reference output for an input x (B, T, hidden)."""

from __future__ import annotations

import importlib

import torch

HIDDEN = 32
SMALL = {"hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
         "num_hidden_layers": 2, "vocab_size": 64, "attention_dropout": 0.0}  # fmt: skip


def _module(family: str, name: str):
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


def _randomise(module: torch.nn.Module, keep=("A_log", "dt_bias")) -> None:
    """Weights N(0, 0.3) (norm weights included, so a QK-norm or (1 + w) offset is exercised)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in keep:
                p.normal_(0, 0.3)


def _rotary_attention(family: str, config_name: str, attention: str, **options):
    import transformers
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = getattr(transformers, config_name)(**{**SMALL, **options})
    config._attn_implementation = "eager"
    module = _module(family, attention)(config, 1).eval()
    _randomise(module)
    rotary_name = [
        n for n in dir(importlib.import_module(module.__module__)) if n.endswith("RotaryEmbedding")
    ]
    rotary = _module(family, [n for n in rotary_name if "Vision" not in n][0])(config)
    sliding = (
        getattr(config, "sliding_window", None) is not None and getattr(config, "layer_types", None) is None
    )

    def reference(x):
        positions = torch.arange(x.shape[1])[None]
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make_mask(
            config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions
        )
        return module(x, position_embeddings=rotary(x, positions), attention_mask=mask)[0]

    return module, reference


def _gpt2():
    import transformers
    from transformers.masking_utils import create_causal_mask

    config = transformers.GPT2Config(n_embd=HIDDEN, n_head=4, n_layer=2, attn_pdrop=0.0, resid_pdrop=0.0)
    config._attn_implementation = "eager"
    module = _module("gpt2", "GPT2Attention")(config, layer_idx=0).eval()
    _randomise(module)

    def reference(x):
        positions = torch.arange(x.shape[1])[None]
        mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=positions)  # fmt: skip
        return module(x, attention_mask=mask)[0]

    return module, reference


def _bert():
    import transformers

    config = transformers.BertConfig(
        hidden_size=HIDDEN, num_attention_heads=4, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0
    )
    config._attn_implementation = "eager"
    module = _module("bert", "BertAttention")(config).eval()
    _randomise(module)
    # the mixer is self-attention + output.dense; the residual LayerNorm belongs to the block
    return module, lambda x: module.output.dense(module.self(x)[0])


def _deltanet(family: str, config_name: str, name: str):
    import transformers

    config = getattr(transformers, config_name)(
        hidden_size=HIDDEN, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )  # fmt: skip
    module = _module(family, name)(config, 0).eval()
    _randomise(module)
    return module, lambda x: module(x)


FAMILIES = {
    "llama": lambda: _rotary_attention("llama", "LlamaConfig", "LlamaAttention"),
    "mistral_sliding": lambda: _rotary_attention(
        "mistral", "MistralConfig", "MistralAttention", sliding_window=5
    ),
    "qwen2": lambda: _rotary_attention("qwen2", "Qwen2Config", "Qwen2Attention"),
    "qwen3": lambda: _rotary_attention("qwen3", "Qwen3Config", "Qwen3Attention", head_dim=16),
    "qwen3_next_gated": lambda: _rotary_attention(
        "qwen3_next", "Qwen3NextConfig", "Qwen3NextAttention", head_dim=16
    ),
    "qwen3_5_gated": lambda: _rotary_attention(
        "qwen3_5", "Qwen3_5TextConfig", "Qwen3_5Attention", head_dim=16
    ),
    "qwen3_next_deltanet": lambda: _deltanet("qwen3_next", "Qwen3NextConfig", "Qwen3NextGatedDeltaNet"),
    "qwen3_5_deltanet": lambda: _deltanet("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5GatedDeltaNet"),
    "gpt2": _gpt2,
    "bert": _bert,
}
