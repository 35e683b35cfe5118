"""export_lm: a lab LM of softmax layers saved as a Llama (Qwen3 with QK-norm) checkpoint that
AutoModelForCausalLM loads with the LM's logits; other patterns are refused by layer."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gatelab.hf import export_lm  # noqa: E402
from gatelab.lab.models.lm import LM, LMConfig  # noqa: E402
from gatelab.testing import assert_close  # noqa: E402


@pytest.mark.parametrize(
    "options,tie,expected",
    [
        ({"n_kv_heads": 2}, True, "LlamaForCausalLM"),
        ({"qk_norm": True, "bias": True}, False, "Qwen3ForCausalLM"),
    ],
)
def test_exported_checkpoint_loads_with_the_lm_logits(tmp_path, options, tie, expected):
    lm = LM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, tie_embeddings=tie, seed=0,
                     mixer_options={"softmax": options})).eval()  # fmt: skip
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))  # norms away from 1, biases away from 0
    export_lm(lm, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == expected
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert_close("exported logits", model(ids).logits, lm(ids)[0], torch.float32)
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, lm.generate(ids[:1, :4], max_new_tokens=5))


def test_export_refusals(tmp_path):
    gated = LM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, pattern="softmax,gated_softmax"))
    with pytest.raises(ValueError, match="layer 1 is 'gated_softmax'"):
        export_lm(gated, tmp_path / "a")
    lm = LM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        export_lm(lm, tmp_path / "b")
    with pytest.raises(TypeError, match="gatelab lab LM"):
        export_lm(torch.nn.Linear(2, 2), tmp_path / "c")
