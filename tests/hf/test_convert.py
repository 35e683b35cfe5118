"""from_hf_attention: the gatelab mixer equals the transformers module it was built from, family by family
(fp32, relative RMS within the tolerance table): the forward, decoding token by token from a prefix, and the
gradient with respect to the input; unsupported modules and options are refused by name."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_families import FAMILIES, HIDDEN  # noqa: E402

from gatelab.hf import from_hf_attention  # noqa: E402
from gatelab.testing import assert_close, rel_rms  # noqa: E402

MECHANISMS = {"llama": "softmax", "mistral_sliding": "sliding_window", "qwen2": "softmax", "qwen3": "softmax",
              "qwen3_next_gated": "gated_softmax", "qwen3_5_gated": "gated_softmax",
              "qwen3_next_deltanet": "gated_deltanet", "qwen3_5_deltanet": "gated_deltanet",
              "gpt2": "softmax", "bert": "softmax"}  # fmt: skip


def forward_and_decode_errors(family: str) -> tuple[float, float | None]:
    """(forward, decode) relative RMS errors of the gatelab mixer against the transformers module on x
    (2, 11, hidden); decode: a 4-token prefix, then one token at a time (None for a bidirectional module)."""
    module, reference = FAMILIES[family]()
    mixer = from_hf_attention(module)
    x = torch.randn(2, 11, HIDDEN)
    with torch.no_grad():
        expected = reference(x)
        forward = rel_rms(mixer(x)[0], expected)
        if not mixer.config.causal:
            return forward, None
        y, state = mixer(x[:, :4])
        parts = [y]
        for t in range(4, x.shape[1]):
            y, state = mixer(x[:, t : t + 1], state)
            parts.append(y)
    return forward, rel_rms(torch.cat(parts, dim=1), expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_and_decode_equal_the_transformers_module(family):
    forward, decode = forward_and_decode_errors(family)
    tolerance = 1e-4  # gatelab.testing.TOLERANCE[torch.float32]
    assert forward <= tolerance, f"{family}: forward relative RMS {forward:.2e}"
    assert decode is None or decode <= tolerance, f"{family}: decode relative RMS {decode:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mechanism_and_weights(family):
    module, _ = FAMILIES[family]()
    mixer = from_hf_attention(module)
    assert mixer.mechanism == MECHANISMS[family]
    assert next(mixer.parameters()).dtype == torch.float32
    if family in ("llama", "qwen2", "qwen3", "qwen3_next_gated"):
        assert mixer.config.kv_heads == 2 and mixer.config.n_heads == 4  # grouped-query heads
    if family == "qwen2":
        assert mixer.q_proj.bias is not None and mixer.o_proj.bias is None
    if family.startswith("qwen3_next_gated"):
        assert mixer.config.rope_dims == 4 and mixer.config.fused == "per_head"  # partial_rotary_factor 0.25


@pytest.mark.parametrize("family", ["llama", "qwen3_next_gated", "qwen3_next_deltanet", "gpt2", "bert"])
def test_input_gradient_equals_the_transformers_module(family):
    module, reference = FAMILIES[family]()
    mixer = from_hf_attention(module)
    x = torch.randn(2, 9, HIDDEN)
    weight = torch.randn(2, 9, HIDDEN)
    grads = []
    for run in (reference, lambda t: mixer(t)[0]):
        xi = x.clone().requires_grad_(True)
        (run(xi) * weight).sum().backward()
        grads.append(xi.grad)
    assert_close(f"{family} dL/dx", grads[1], grads[0], torch.float32)
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_module_dtype_is_kept_and_options_override():
    module, reference = FAMILIES["qwen3_next_gated"]()
    module.to(torch.bfloat16)
    mixer = from_hf_attention(module, backend="reference")
    assert next(mixer.parameters()).dtype == torch.bfloat16 and mixer.config.backend == "reference"
    x = torch.randn(2, 9, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close("bf16", mixer(x)[0], reference(x), torch.bfloat16)


def test_unsupported_module_names_its_class():
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTAttention

    with pytest.raises(TypeError, match="OPTAttention is not supported"):
        from_hf_attention(OPTAttention(OPTConfig(hidden_size=32, num_attention_heads=4), layer_idx=0))
    with pytest.raises(TypeError, match="nn.Module"):
        from_hf_attention("LlamaAttention")


def test_dropout_is_refused_unless_dropped():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    module = GPT2Attention(GPT2Config(n_embd=32, n_head=4), layer_idx=0)  # attn_pdrop 0.1 by default
    with pytest.raises(ValueError, match="no dropout.*attn_pdrop"):
        from_hf_attention(module)
    assert from_hf_attention(module, drop_dropout=True).mechanism == "softmax"


def test_scaled_rope_is_refused():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    rope = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, rope_parameters=rope)
    with pytest.raises(ValueError, match="RoPE type 'linear' is not supported"):
        from_hf_attention(LlamaAttention(config, 0))


def test_bert_padding_mask_through_the_adapter():
    """A padded BERT batch: the adapter folds the padding into the keys; the real tokens' outputs match."""
    from gatelab.hf import HFAttention

    module, _ = FAMILIES["bert"]()
    adapter = HFAttention(from_hf_attention(module), layer_idx=0)
    x = torch.randn(2, 7, HIDDEN)
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, 5:] = False  # the second row has 5 tokens
    mask = padding[:, None, None, :].expand(2, 1, 7, 7)  # (B, 1, T, S) bool, True = attend
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = module.output.dense(module.self(x, attention_mask=additive)[0])
        for given in (mask, additive, padding.long()):
            y, weights = adapter(x, attention_mask=given)
            assert weights is None
            assert_close("bert padded", y[padding], expected[padding], torch.float32)
        unmasked, _ = adapter(x)
    assert rel_rms(unmasked[1, :5], expected[1, :5]) > 1e-3  # the mask did matter


if __name__ == "__main__":  # the per-family table of BENCHMARKS.md: python tests/hf/test_convert.py
    torch.manual_seed(0)
    print("| family | gatelab mechanism | forward rel. RMS | decode rel. RMS |\n|---|---|---|---|")
    for family in sorted(FAMILIES):
        forward, decode = forward_and_decode_errors(family)
        decode = "n/a (bidirectional)" if decode is None else f"{decode:.1e}"
        print(f"| {family} | {MECHANISMS[family]} | {forward:.1e} | {decode} |")
