"""patch: a transformers causal LM with its attention replaced by a gatelab mechanism stays a transformers
model. A pass-through gate gives the original logits; generate() (greedy, left-padded batches), training
with a torch loop and save_pretrained / load_patched work; what a gatelab state cannot do is refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.hf import HFAttention, load_patched, patch  # noqa: E402
from gatelab.testing import assert_close  # noqa: E402

TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
        "num_hidden_layers": 2, "vocab_size": 64}  # fmt: skip


def tiny_lm(family: str = "llama"):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=64, attn_pdrop=0.0,
                                         resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    elif family == "qwen3_next":  # a hybrid: Gated DeltaNet layers and gated attention layers
        config = transformers.Qwen3NextConfig(**TINY, head_dim=8, linear_num_value_heads=4,
                                              linear_num_key_heads=2, linear_key_head_dim=8,
                                              linear_value_head_dim=8, num_experts=0,
                                              layer_types=["linear_attention", "full_attention"])  # fmt: skip
    elif family == "mistral":  # a sliding window of 4 (the token and 3 before it)
        config = transformers.MistralConfig(**TINY, sliding_window=4)
    else:
        names = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
        config = getattr(transformers, names[family])(**TINY)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


PASS_THROUGH = [
    ("llama", "gated_softmax", {}),
    ("llama", "gated_softmax", {"gate": "headwise"}),
    ("llama", "gated_heads", {}),
    ("llama", "clipped_softmax", {"alpha": None, "gamma": 0.0, "zeta": 1.0}),
    ("qwen2", "gated_softmax", {}),
    ("qwen3", "gated_softmax", {}),
    ("gpt2", "gated_softmax", {}),
    ("qwen3_next", "gated_softmax", {}),
    ("mistral", "sliding_window", {}),  # the window read from the layer, no sinks: the original
]


@pytest.mark.parametrize("family,key,options", PASS_THROUGH, ids=str)
def test_pass_through_patch_keeps_the_logits(family, key, options):
    model = tiny_lm(family)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        patch(model, key, **options)
        got = model(ids).logits
    assert sum(isinstance(m, HFAttention) for m in model.modules()) == (1 if family == "qwen3_next" else 2)
    assert_close(f"{family} {key}", got, expected, torch.float32)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_next", "mistral"])
def test_generate_on_a_patched_model_equals_the_original(family):
    """Greedy generate() of one prompt and of a left-padded batch (the padding folded into the keys)."""
    model = tiny_lm(family)
    prompt = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0  # left padding: the second prompt has 4 tokens
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(prompt[:1], **options)
    expected_padded = model.generate(prompt, attention_mask=mask, **options)
    if family == "mistral":  # sliding window: decoding past the window, unpadded (padding is refused)
        patch(model, "sliding_window")
        assert torch.equal(model.generate(prompt[:1], **options), expected)
        return
    patch(model, "gated_softmax")
    assert torch.equal(model.generate(prompt[:1], **options), expected)
    assert torch.equal(model.generate(prompt, attention_mask=mask, **options), expected_padded)


def test_decoding_with_the_cache_equals_full_recomputation():
    """Sliding window with sinks: greedy generate() (the gatelab state in the model's Cache) gives the
    tokens that recomputing the whole sequence without a cache gives."""
    model = patch(tiny_lm(), "sliding_window", init="random", window=4, sinks=2)
    seq = torch.randint(1, 64, (1, 5))
    generated = model.generate(seq, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_cache_policy_patch_decodes_under_the_policy():
    model = patch(tiny_lm(), "softmax", cache_policy="streaming", policy_options={"budget": 6, "sinks": 2})
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 12)), cache=cache, use_cache=True)
    state = cache.layers[0].state
    assert state.length == 12 and state.kept_tokens == 6 * 2  # budget per KV head (2 KV heads)
    assert cache.get_seq_length() == 12
    out = model.generate(torch.randint(1, 64, (1, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_patched_model_trains_with_a_torch_loop():
    model = patch(tiny_lm(), "gated_softmax").train()
    gate = model.model.layers[0].self_attn.mixer.gate_proj.weight
    before = gate.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 10))
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss) and not torch.equal(gate.detach(), before)


def test_save_pretrained_and_load_patched(tmp_path):
    model = patch(tiny_lm(), "gated_heads")
    with torch.no_grad():
        for p in model.model.layers[1].self_attn.mixer.parameters():
            p.add_(0.01)  # as after training: the reloaded weights must be these, not a fresh init
    model.save_pretrained(tmp_path)
    reloaded = load_patched(tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert_close("reloaded", reloaded(ids).logits, model(ids).logits, torch.float32)
    assert reloaded.config.gatelab_patch["key"] == "gated_heads"
    with pytest.raises(ValueError, match="holds no gatelab patch"):
        tiny_lm().save_pretrained(tmp_path / "plain")
        load_patched(tmp_path / "plain")


def test_refusals():
    with pytest.raises(ValueError, match="already patched"):
        patch(patch(tiny_lm(), "softmax"), "softmax")
    with pytest.raises(ValueError, match="pass-through init needs gate_fn='sigmoid'"):
        patch(tiny_lm(), "gated_softmax", gate_fn="silu")
    with pytest.raises(ValueError, match="gated_softmax with .*'softmax' has no option"):
        patch(tiny_lm("qwen3_next"), "softmax")  # would drop Qwen3-Next's gate
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64
    )
    bert = transformers.BertForMaskedLM(config)
    with pytest.raises(TypeError, match="BertAttention"):
        patch(bert, "softmax")
    model = patch(tiny_lm(), "sliding_window", init="random", window=4, sinks=2)
    with pytest.raises(ValueError, match="padded batches need a mixer whose cache keeps every token"):
        model(torch.randint(0, 64, (2, 6)), attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    with pytest.raises(NotImplementedError, match="beam search"):
        patch(tiny_lm(), "softmax").generate(torch.randint(1, 64, (1, 4)), max_new_tokens=3, num_beams=2,
                                             do_sample=False, pad_token_id=0)  # fmt: skip
