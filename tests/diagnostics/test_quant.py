import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.lab.diagnostics import fake_quantize_int8, lm_loss, w8a8, w8a8_loss


def test_fake_quantize_int8_grid_and_error():
    x = torch.randn(1000) * 3
    q = fake_quantize_int8(x)
    scale = x.abs().max() / 127
    assert q.shape == x.shape and q.dtype == x.dtype
    assert float(q.abs().max()) == pytest.approx(float(x.abs().max()))  # the max is on the grid
    assert torch.unique(q).numel() <= 255
    assert float((q - x).abs().max()) <= float(scale) / 2 + 1e-6
    torch.testing.assert_close(q / scale, torch.round(q / scale), atol=1e-4, rtol=0)
    zero = torch.zeros(4)
    assert torch.equal(fake_quantize_int8(zero), zero)


def test_an_outlier_coarsens_the_grid():
    x = torch.linspace(-1, 1, 101)
    with_outlier = torch.cat([x, torch.tensor([1000.0])])
    err_plain = (fake_quantize_int8(x) - x).abs().max()
    err_outlier = (fake_quantize_int8(with_outlier)[:-1] - x).abs().max()
    assert err_outlier > 50 * err_plain


def test_w8a8_quantises_weights_and_inputs_then_restores(tiny_lm):
    lin = tiny_lm.mlps[0]
    x = torch.randn(3, 8)
    before = {name: p.detach().clone() for name, p in tiny_lm.named_parameters()}
    with w8a8(tiny_lm):
        y = lin(x)
        expected = F.linear(fake_quantize_int8(x), fake_quantize_int8(before["mlps.0.weight"]), lin.bias)
        torch.testing.assert_close(y, expected)
        # the tied head weight (shared with the embedding) is quantised once, not twice
        torch.testing.assert_close(tiny_lm.head.weight, fake_quantize_int8(before["embed.weight"]))
    for name, p in tiny_lm.named_parameters():
        assert torch.equal(p, before[name]), name
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))  # hooks removed


def test_w8a8_restores_on_error(tiny_lm):
    before = tiny_lm.mlps[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with w8a8(tiny_lm):
            raise RuntimeError("boom")
    assert torch.equal(tiny_lm.mlps[0].weight, before)
    assert not tiny_lm.mlps[0]._forward_pre_hooks


def test_lm_loss_matches_cross_entropy_over_labelled_positions(tiny_lm, batches):
    with torch.no_grad():
        logits = torch.cat([tiny_lm(i)[0] for i, _ in batches])
    targets = torch.cat([t for _, t in batches])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert lm_loss(tiny_lm, batches) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="labelled"):
        lm_loss(tiny_lm, [(batches[0][0], torch.full_like(batches[0][1], -100))])


def test_w8a8_gap_is_zero_for_a_model_already_on_the_grid(batches):
    # weights already int8-valued with max 127 and inputs whose max |x| is 127 are exact on the grid:
    # the gap must vanish. (A plain embedding lookup feeds the head.)
    class Grid(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 4)
            self.head = nn.Linear(4, 16, bias=False)
            with torch.no_grad():
                self.embed.weight.copy_(torch.randint(-126, 127, (16, 4)).float())
                self.embed.weight[0, 0] = 127.0
                self.head.weight.copy_(torch.randint(-126, 127, (16, 4)).float() / 1000)
                self.head.weight[0, 0] = 0.127

        def forward(self, idx):
            return self.head(self.embed(idx)), None

    model = Grid()
    batches = [(torch.cat([torch.zeros(3, 1, dtype=torch.long), i[:, 1:]], 1), t) for i, t in batches]
    result = w8a8_loss(model, batches)
    assert result["w8a8_gap"] == pytest.approx(0.0, abs=1e-5)
    assert result["loss_fp32"] == pytest.approx(lm_loss(model, batches))


def test_w8a8_quantises_the_lm_tied_output_head():
    """The lab's LM ties its output head to the embedding through one Parameter: W8A8 rounds that matrix
    once and the head's input like every Linear's."""
    from gatelab.lab.models.lm import LM, LMConfig

    model = LM(LMConfig(d_model=32, n_layers=1, n_heads=2, seed=0, max_seq_len=8))
    assert model.head.weight is model.embed.weight
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        h = model.norm(model.blocks[0](model.embed(idx), None, False)[0])
        with w8a8(model):
            assert model.head.weight.unique().numel() <= 255
            expected = F.linear(fake_quantize_int8(h), model.embed.weight)
            torch.testing.assert_close(model.head(h), expected)


def test_w8a8_keeps_the_named_modules_in_full_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    original = [m.weight.detach().clone() for m in model]
    x = torch.randn(3, 8)
    with w8a8(model, keep_fp=[model[1]]):
        assert not torch.equal(model[0].weight, original[0])  # quantised
        assert torch.equal(model[1].weight, original[1])  # kept
        y = model(x)
    expected = model[1](F.linear(fake_quantize_int8(x), fake_quantize_int8(original[0]), model[0].bias))
    torch.testing.assert_close(y, expected)
    assert all(torch.equal(m.weight, w) for m, w in zip(model, original))
