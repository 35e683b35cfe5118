"""QTSplus: the budget stays in [rho_min, rho_max]; the Newton threshold meets its target; inference keeps
exactly n tokens in stream order (a hard gate); training's straight-through gate is hard forward with a
gradient; n = N without re-encoder returns the stream; each sample's output is its own (the padding mask the
official code lacks); clear errors for bad budgets and shapes."""

import pytest
import torch

import gatelab
from gatelab.routers.qtsplus import QTSplus, QTSplusConfig, newton_threshold
from gatelab.testing import assert_close


def _selector(**options):
    torch.manual_seed(0)
    return QTSplus(QTSplusConfig(**{"d_model": 16, "n_heads": 2, "budget_hidden": 8, **options}))


def _stream(B=3, N=24, M=4):
    torch.manual_seed(1)
    return torch.randn(B, N, 16), torch.randn(B, M, 16)


def test_registered_as_a_gate_not_a_mixer():
    spec = gatelab.get("qtsplus")
    assert spec.family == "gate" and spec.extra["role"] == "token_selector" and not spec.causal
    assert isinstance(gatelab.make_mixer("qtsplus", d_model=16, n_heads=2), QTSplus)


def test_budget_is_in_range_and_inference_keeps_exactly_n_sorted():
    selector = _selector(rho_min=0.1, rho_max=0.4).eval()
    x, query = _stream()
    with torch.no_grad():
        out = selector(x, query)
    assert ((out.rho >= 0.1) & (out.rho <= 0.4)).all()
    assert torch.equal(out.n, torch.ceil(out.rho * 24).long())
    assert torch.equal(out.mask.sum(-1), out.n)
    for b in range(3):
        kept = out.indices[b, : int(out.n[b])]
        assert torch.equal(kept, kept.sort().values)  # stream order
        assert torch.equal(kept.sort().values, out.scores[b].topk(int(out.n[b])).indices.sort().values)
        assert set(out.keep[b].unique().tolist()) <= {0.0, 1.0}  # a hard gate
    assert (out.tokens[~out.mask] == 0).all()


def test_n_max_caps_the_kept_tokens():
    out = _selector(rho_min=0.5, rho_max=0.5, n_max=3).eval()(*_stream())
    assert torch.equal(out.n, torch.full((3,), 3))


def test_keeping_everything_without_reencoder_returns_the_stream():
    x, query = _stream()
    out = _selector(rho_min=1.0, rho_max=1.0, reencode=False).eval()(x, query)
    assert torch.equal(out.tokens, x) and out.mask.all()


def test_newton_threshold_meets_the_target():
    torch.manual_seed(0)
    r = torch.rand(4, 50)
    target = torch.tensor([5.0, 10.0, 20.0, 30.0])
    t = newton_threshold(r, target, tau=0.1, steps=10)
    assert_close("newton", torch.sigmoid((r - t[:, None]) / 0.1).sum(-1), target, torch.float32)


def test_training_gate_is_hard_with_a_nonzero_gradient_and_keeps_at_least_one():
    selector = _selector().train()
    x, query = _stream()
    x.requires_grad_(True)
    out = selector(x, query, generator=torch.Generator().manual_seed(0))
    assert set(out.keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert (out.mask.sum(-1) >= 1).all()
    (out.tokens.square().sum() + sum(out.aux.values())).backward()
    assert selector.scorer.k_proj.weight.grad.abs().sum() > 0  # through the keep gate
    assert selector.budget[0].weight.grad.abs().sum() > 0  # through the auxiliary losses
    # a gate so tight that the Gumbel-softmax drops everything still keeps the best token
    tight = _selector(rho_min=1e-6, rho_max=1e-6).train()
    kept = tight(x.detach(), query, generator=torch.Generator().manual_seed(0)).mask.sum(-1)
    assert (kept >= 1).all()


def test_each_sample_is_selected_and_reencoded_on_its_own():
    """The official code pads with repeats and no key mask, so a sample's output depends on its batch; here
    a sample alone gives the same kept tokens as in the batch."""
    selector = _selector().eval()
    x, query = _stream()
    with torch.no_grad():
        batch = selector(x, query)
        for b in range(3):
            alone = selector(x[b : b + 1], query[b : b + 1])
            n = int(alone.n[0])
            assert torch.equal(alone.indices[0], batch.indices[b, :n])
            assert_close(f"sample {b}", alone.tokens[0], batch.tokens[b, :n], torch.float32)


def test_aux_losses():
    selector = _selector(n_max=10, loss_weights=(1.0, 1.7, 0.05)).eval()
    out = selector(*_stream())
    kept = out.rho * 24
    assert_close("flops", out.aux["flops"], (kept / 10).square().mean(), torch.float32)
    assert_close("kv", out.aux["kv"], 1.7 * (kept / 10).mean(), torch.float32)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rho_min": 0.6, "rho_max": 0.5}, "rho_min <= rho_max"),
        ({"rho_min": 0.0}, "0 < rho_min"),
        ({"rho_max": 1.5}, "rho_max <= 1"),
        ({"n_max": 0}, "n_max must be a positive int"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"d_model": 15}, "divisible by n_heads"),
        ({"loss_weights": (1.0, 1.0)}, "loss_weights must be three"),
    ],
)
def test_bad_budgets_and_options(options, match):
    with pytest.raises(ValueError, match=match):
        QTSplusConfig(**{"d_model": 16, "n_heads": 2, **options})


def test_bad_shapes():
    selector = _selector()
    x, query = _stream()
    with pytest.raises(ValueError, match=r"x must be a float tensor \(B, N, d_model\) with d_model=16"):
        selector(x[..., :8], query)
    with pytest.raises(ValueError, match=r"query must be a float tensor \(B, M, d_model\)"):
        selector(x, query[0])
    with pytest.raises(ValueError, match="same batch"):
        selector(x, query[:2])
    with pytest.raises(ValueError, match="at least one token"):
        selector(x[:, :0], query)
    with pytest.raises(TypeError, match="QTSplusConfig"):
        QTSplus({"d_model": 16})
