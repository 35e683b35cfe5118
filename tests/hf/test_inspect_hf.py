"""``gatelab inspect --hf`` on tiny random transformers models built here (a BERT with an MLM head, a
headless BERT, a Llama), with word-level tokenizers written next to them: no download, no network."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gatelab.cli import main  # noqa: E402
from gatelab.hf.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from gatelab.lab.diagnostics import first_token_share, key_share, sequence_outlier_stats  # noqa: E402
from gatelab.lab.diagnostics.hf import (  # noqa: E402
    diagnose_hf,
    loss_batches,
    token_windows,
)

WORDS = "the cat sat on a mat and then it ran to see . dog bird sun tree".split()
TEXT = "\n\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(20))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _word_tokenizer(special: list[str], **tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(special + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special[1]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokens), len(vocab)


def _bert(path, head: bool = True):
    tokenizer, vocab = _word_tokenizer(
        SPECIAL,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _llama(path):
    tokenizer, vocab = _word_tokenizer(
        ["<pad>", "<unk>", "<s>"], pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("llama"))


def _text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_bert_diagnostics_match_the_models_own_outputs(bert):
    checkpoint = load_checkpoint(bert)
    assert checkpoint.kind == "encoder" and checkpoint.head and not checkpoint.causal
    windows = token_windows(checkpoint.tokenizer, TEXT, "encoder", 16, 4)
    cls, sep = checkpoint.tokenizer.cls_token_id, checkpoint.tokenizer.sep_token_id
    assert (windows[:, 0] == cls).all() and (windows[:, -1] == sep).all() and windows.shape == (4, 16)
    result = diagnose_hf(checkpoint, windows, 2)
    with torch.no_grad():
        out = checkpoint.model(input_ids=windows, output_attentions=True, output_hidden_states=True)
    # the sink share per head is the one of the model's own attention probabilities ([CLS] is key 0)
    for layer, attn in enumerate(out.attentions):
        assert result["sink_share"][layer] == pytest.approx(first_token_share(attn).tolist(), rel=1e-5)
        assert result["special_share"]["[SEP]"][layer] == pytest.approx(
            key_share(attn, windows == sep).tolist(), rel=1e-5
        )
    assert result["first_token"] == "[CLS]" and set(result["special_share"]) == {"[CLS]", "[SEP]"}
    # bidirectional: a uniform head gives each of the S keys 1 / S
    assert result["sink_share_uniform"] == pytest.approx(1 / 16)
    assert result["special_share_uniform"]["[SEP]"] == pytest.approx(1 / 16)
    # hidden states h_0..h_L are BERT's own (post-norm: each layer's output)
    for i, h in enumerate(out.hidden_states):
        assert result["max_activation"][i] == pytest.approx(float(h.abs().max()), rel=1e-5)
    top = result["top_dims"][2][0]
    h = out.hidden_states[2].abs()
    assert top["value"] == pytest.approx(float(h.max()), rel=1e-6) and top["dim"] == int(
        h.amax(dim=(0, 1)).argmax()
    )
    # the largest output of a module, with its channel: BERT's output LayerNorm returns h_2
    assert result["module_top_dims"][1]["output.LayerNorm"][0] == result["top_dims"][2][0]
    tops = [rows[0]["value"] for layer in result["module_top_dims"] for rows in layer.values()]
    assert result["summary"]["top_module_activation"]["value"] == max(tops)
    # Quantizable Transformers' modules: the residual-writing projections and the norms, no duplicate of
    # the layer output (the output LayerNorm's tensor is the layer's output)
    modules = result["modules"][1]
    assert set(modules) == {
        "attention.output.dense",
        "attention.output.LayerNorm",
        "output.dense",
        "output.LayerNorm",
    }
    inf, kurt = sequence_outlier_stats(out.hidden_states[2])
    assert modules["output.LayerNorm"]["inf_norm"] == pytest.approx(float(inf.mean()), rel=1e-5)
    assert modules["output.LayerNorm"]["kurtosis"] == pytest.approx(float(kurt.mean()), rel=1e-5)
    assert result["block_inf_norm"][1] == pytest.approx(max(m["inf_norm"] for m in modules.values()))
    assert result["summary"]["avg_kurtosis"] == pytest.approx(
        sum(m["kurtosis"] for layer in result["modules"] for m in layer.values()) / 8
    )
    # W8A8: a masked-LM loss, the head left in FP, and the hidden-state figures
    assert "masked-LM" in result["loss_kind"] and result["w8a8_gap"] == pytest.approx(
        result["loss_w8a8"] - result["loss_fp32"]
    )
    assert 0 < result["w8a8_hidden_rel_error"] < 1 and 0 < result["w8a8_embedding_cosine"] <= 1


def test_diagnose_hf_checks_its_input_and_restores_the_mode(bert):
    checkpoint = load_checkpoint(bert)
    windows = token_windows(checkpoint.tokenizer, TEXT, "encoder", 16, 2)
    with pytest.raises(ValueError, match=r"shape \(N, T\), long"):
        diagnose_hf(checkpoint, windows.float(), 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        diagnose_hf(checkpoint, windows, 0)
    checkpoint.model.train()
    a = diagnose_hf(checkpoint, windows, 2, quantization=False)
    b = diagnose_hf(checkpoint, windows, 1, quantization=False)  # dropout off: the same in any batching
    assert checkpoint.model.training and a["sink_share_layer"] == pytest.approx(
        b["sink_share_layer"], rel=1e-5
    )


def test_masked_lm_batches_mask_only_plain_tokens(bert):
    checkpoint = load_checkpoint(bert)
    windows = token_windows(checkpoint.tokenizer, TEXT, "encoder", 16, 4)
    (inputs, targets), _ = loss_batches(windows, checkpoint, 2, seed=0)
    chosen = targets != -100
    assert chosen.any(dim=1).all() and not chosen[:, [0, -1]].any()
    assert (inputs[chosen] == checkpoint.tokenizer.mask_token_id).all()
    assert (targets[chosen] == windows[:2][chosen]).all() and (inputs[~chosen] == windows[:2][~chosen]).all()


def test_llama_is_a_decoder_with_next_token_loss(llama):
    checkpoint = load_checkpoint(llama)
    assert checkpoint.kind == "decoder" and checkpoint.causal
    windows = token_windows(checkpoint.tokenizer, TEXT, "decoder", 12, 4)
    assert (windows[:, 0] == checkpoint.tokenizer.bos_token_id).all()
    result = diagnose_hf(checkpoint, windows, 4)
    with torch.no_grad():
        out = checkpoint.model(input_ids=windows, output_attentions=True, labels=windows)
    assert result["loss_kind"] == "next-token" and result["loss_fp32"] == pytest.approx(
        float(out.loss), rel=1e-5
    )
    for layer, attn in enumerate(out.attentions):
        assert result["sink_share"][layer] == pytest.approx(first_token_share(attn).tolist(), rel=1e-5)
    assert result["sink_share_uniform"] == pytest.approx(sum(1 / (t + 1) for t in range(12)) / 12)
    # pre-norm: the modules are the projections and the norms, plus the layer output (the residual stream)
    assert set(result["modules"][0]) == {
        "self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm", "layer"
    }  # fmt: skip


def test_cli_writes_table_report_heat_maps(bert, tmp_path, capsys):
    text, out = _text_file(tmp_path), tmp_path / "out"
    args = ["inspect", "--hf", str(bert), "--text", str(text), "--seq-len", "16", "--batches", "2",
            "--batch-size", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[CLS] share" in printed and "[SEP] share" in printed and "masked-LM" in printed
    assert {p.name for p in out.iterdir()} >= {
        "results.json", "report.md", "sink_share_heads.png", "SEP_share_heads.png", "attn_entropy_heads.png"
    }  # fmt: skip
    assert (out / "sink_share_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["kind"] == "encoder" and len(results["sink_share"]) == 2
    assert "| layer |" in (out / "report.md").read_text()
    assert main(args) != 0 and "--overwrite" in capsys.readouterr().err  # refused before any work
    assert main([*args, "--overwrite", "--json", "--no-quant"]) == 0
    assert "loss_fp32" not in json.loads(capsys.readouterr().out)


def test_headless_encoder_has_no_loss_but_the_hidden_state_gap(tmp_path, capsys):
    path = _bert(tmp_path / "headless", head=False)
    checkpoint = load_checkpoint(path)
    assert checkpoint.kind == "encoder" and not checkpoint.head
    result = diagnose_hf(checkpoint, token_windows(checkpoint.tokenizer, TEXT, "encoder", 16, 2), 2)
    assert "loss_fp32" not in result and result["summary"]["w8a8_gap"] is None
    assert result["summary"]["w8a8_embedding_cosine"] is not None


def test_clear_errors(tmp_path, bert, capsys):
    with pytest.raises(ValueError, match="not a local folder: gatelab never downloads"):
        resolve_checkpoint("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_checkpoint(tmp_path / "empty")
    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_checkpoint(t5)
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(vit)
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_checkpoint(vit)
    checkpoint = load_checkpoint(bert)
    with pytest.raises(ValueError, match="longer --text"):
        token_windows(checkpoint.tokenizer, "the cat", "encoder", 16, 2)
    for args, message in (
        ([str(tmp_path), "--hf", str(bert)], "either a run"),
        (["--hf", str(bert), "--seq-len", "128"], "longer than the model's 64 positions"),
        (["--hf", "bert-base-uncased"], "never downloads"),
        (["--hf", str(bert), "--text", str(tmp_path / "missing.txt")], "no such file"),
        ([str(tmp_path), "--text", str(tmp_path)], "only apply with --hf"),
    ):
        assert main(["inspect", *args]) != 0 and message in capsys.readouterr().err


class _GatedAttention(torch.nn.Module):
    """Stands in for a patched attention: a gatelab gated_softmax mixer where Llama's self_attn was,
    returning no attention weights (so the probabilities and gates can only come from the mixer)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        import gatelab

        self.mixer = gatelab.make_mixer("gated_softmax", d_model=d_model, n_heads=n_heads)

    def forward(self, hidden_states, **_kwargs):
        y, _state = self.mixer(hidden_states)
        return y, None


def test_gates_and_attention_of_a_gatelab_mixer_inside_the_model(llama):
    checkpoint = load_checkpoint(llama)
    checkpoint.model.model.layers[1].self_attn = _GatedAttention(32, 4)
    windows = token_windows(checkpoint.tokenizer, TEXT, "decoder", 12, 2)
    result = diagnose_hf(checkpoint, windows, 2, quantization=False)
    mixer = checkpoint.model.model.layers[1].self_attn.mixer
    captured = {}
    handle = mixer.register_forward_hook(lambda _m, args, _out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        checkpoint.model(input_ids=windows)
    handle.remove()
    _, _, internals = mixer(captured["x"], return_internals=True)
    assert result["gate_mean"][0] is None and result["gate_mean"][1] == pytest.approx(
        float(internals["gate"].mean()), rel=1e-5
    )
    assert result["sink_share"][1] == pytest.approx(first_token_share(internals["attn"]).tolist(), rel=1e-5)
    # the caller still gets (y, state) back: the model ran, and the hooks are gone afterwards
    assert mixer._forward_pre_hooks == {} and len(mixer(captured["x"])) == 2


def test_gpt2_conv1d_projections_are_hooked_and_w8a8_is_refused(tmp_path):
    """GPT-2's projections are Conv1D, not nn.Linear: hooked all the same, but the lab's W8A8 would round
    nothing, so it is refused with the way out rather than reported as a zero gap."""
    tokenizer, vocab = _word_tokenizer(
        ["<pad>", "<unk>", "<s>"], pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    checkpoint = load_checkpoint(tmp_path / "gpt2")
    windows = token_windows(checkpoint.tokenizer, TEXT, checkpoint.kind, 12, 2)
    with pytest.raises(ValueError, match="--no-quant"):
        diagnose_hf(checkpoint, windows, 2)
    result = diagnose_hf(checkpoint, windows, 2, quantization=False)
    assert {"attn.c_proj", "mlp.c_proj", "ln_1", "ln_2", "layer"} <= set(result["modules"][0])
