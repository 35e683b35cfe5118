"""Hooks, ablation and patching checked against hand computations on a tiny gatelab LM."""

import pytest
import torch

from gatelab.analysis import (
    ModelLayers,
    Site,
    ablate,
    ablation_scores,
    activation_patching,
    capture,
    hooked,
    mean_heads,
    path_patching,
    replace_all,
    run_with,
    zero_heads,
)
from gatelab.lab.models.lm import LM, LMConfig


def tiny(pattern="softmax", n_layers=2, **options):
    return LM(
        LMConfig(vocab_size=16, d_model=16, n_layers=n_layers, n_heads=2, pattern=pattern, seed=0, **options)
    ).eval()


def prompts(seed=0, B=3, T=7):
    return torch.randint(16, (B, T), generator=torch.Generator().manual_seed(seed))


def last_logit_diff(out):
    return (out[0][:, -1, 3] - out[0][:, -1, 5]).mean()


def test_hooks_that_edit_nothing_change_nothing_bit_for_bit():
    lm, idx = tiny(), prompts()
    expected = lm(idx)[0]
    sites = [Site(k, i) for i in range(2) for k in ("heads", "attn", "resid", "mlp")] + [Site("resid", 2)]
    with hooked(lm, read=sites, edits={Site("heads", 0): zero_heads([]), Site("resid", 1): lambda x: x}):
        got = lm(idx)[0]
    assert torch.equal(got, expected)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.modules())  # all removed on exit


def test_read_sites_match_the_lm_internals():
    lm, idx = tiny(), prompts()
    _, _, internals = lm(idx, return_internals=True)
    sites = [Site("attn", 1), Site("resid", 0), Site("resid", 2)]
    out, cache = capture(lm, lambda: lm(idx), sites)
    assert len(out) == 2  # the caller did not ask for internals and gets none
    assert torch.equal(cache[Site("attn", 1)], internals["mixers"][1]["attn"])
    assert torch.equal(cache[Site("resid", 0)], internals["hidden"][0])
    assert torch.equal(cache[Site("resid", 2)], internals["hidden"][2])


def test_heads_site_is_the_output_projection_input():
    lm, idx = tiny(), prompts()
    _, cache = capture(lm, lambda: lm(idx), [Site("heads", 0), Site("resid", 0)])
    block = lm.blocks[0]
    z = cache[Site("heads", 0)]  # (B, T, H, Dv)
    assert z.shape == (3, 7, 2, 8)
    mixed = block.mixer(block.mixer_norm(cache[Site("resid", 0)]))[0]
    torch.testing.assert_close(block.mixer.o_proj(z.flatten(-2)), mixed, rtol=0, atol=0)


def test_zero_ablating_a_head_equals_zeroing_its_output_projection_columns():
    lm, idx = tiny(), prompts()
    got = run_with(lm, lambda: lm(idx), {Site("heads", 1): zero_heads(0)})[0]
    with torch.no_grad():
        lm.blocks[1].mixer.o_proj.weight[:, :8] = 0
    torch.testing.assert_close(got, lm(idx)[0], rtol=0, atol=1e-6)


def test_ablation_scores_of_a_head_are_the_metric_change():
    lm, idx = tiny(), prompts()
    result = ablation_scores(lm, lambda: lm(idx), last_logit_diff)
    assert result["scores"].shape == (2, 2)
    by_hand = last_logit_diff(ablate(lm, lambda: lm(idx), {1: [1]})) - last_logit_diff(lm(idx))
    assert result["scores"][1, 1].item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_mean_ablation_uses_the_reference_mean_per_head():
    lm, idx, ref = tiny(), prompts(), prompts(seed=1, B=5)
    _, cache = capture(lm, lambda: lm(ref), [Site("heads", 0)])
    mean = cache[Site("heads", 0)].mean(dim=(0, 1))  # (H, Dv)
    seen = {}

    def spy(x):
        seen["x"] = x
        return x

    edits = {Site("heads", 0): lambda x: spy(mean_heads(cache[Site("heads", 0)], 1)(x))}
    run_with(lm, lambda: lm(idx), edits)
    assert torch.equal(seen["x"][:, :, 1], mean[1].expand(3, 7, -1))
    scores = ablation_scores(lm, lambda: lm(idx), last_logit_diff, mode="mean", reference=lambda: lm(ref))
    assert torch.isfinite(scores["scores"]).all()


def test_patching_the_whole_clean_run_reproduces_the_clean_output():
    lm, clean, corrupt = tiny(), prompts(), prompts(seed=1)
    _, cache = capture(lm, lambda: lm(clean), [Site("resid", 0)])
    got = run_with(lm, lambda: lm(corrupt), {Site("resid", 0): replace_all(cache[Site("resid", 0)])})[0]
    assert torch.equal(got, lm(clean)[0])
    result = activation_patching(lm, lambda: lm(clean), lambda: lm(corrupt), last_logit_diff, per="position")
    assert result["patched"].shape == (3, 7)
    # the final stream at the last position decides the last logits, so that patch restores the clean metric
    assert result["normalized"][2, -1].item() == pytest.approx(1.0, abs=1e-5)
    assert (
        result["patched"][2, :-1].sub(result["corrupt"]).abs().max() < 1e-6
    )  # earlier final positions: none


def test_patching_between_identical_prompts_is_a_no_op():
    lm, idx = tiny(), prompts()
    for per in ("head", "layer"):
        result = activation_patching(lm, lambda: lm(idx), lambda: lm(idx), last_logit_diff, per=per)
        assert torch.allclose(result["patched"], torch.tensor(result["clean"]), atol=1e-6)
        assert torch.isnan(result["normalized"]).all()  # clean == corrupt: normalisation undefined


def test_head_patching_equals_patching_that_head_by_hand():
    lm, clean, corrupt = tiny(), prompts(), prompts(seed=1)
    result = activation_patching(lm, lambda: lm(clean), lambda: lm(corrupt), last_logit_diff, per="head")
    _, cache = capture(lm, lambda: lm(clean), [Site("heads", 0)])

    def edit(x):
        new = x.clone()
        new[:, :, 1] = cache[Site("heads", 0)][:, :, 1]
        return new

    by_hand = last_logit_diff(run_with(lm, lambda: lm(corrupt), {Site("heads", 0): edit}))
    assert result["patched"][0, 1].item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_path_patching_to_the_logits_of_the_last_layer_is_plain_noising():
    lm, clean, corrupt = tiny(), prompts(), prompts(seed=1)
    result = path_patching(lm, lambda: lm(clean), lambda: lm(corrupt), last_logit_diff, sender=(1, 0))
    _, other = capture(lm, lambda: lm(corrupt), [Site("heads", 1)])

    def edit(x):
        new = x.clone()
        new[:, :, 0] = other[Site("heads", 1)][:, :, 0]
        return new

    by_hand = last_logit_diff(run_with(lm, lambda: lm(clean), {Site("heads", 1): edit}))
    assert result["patched"] == pytest.approx(by_hand.item(), abs=1e-5)


def test_path_patching_through_a_receiver_only_moves_what_the_receiver_reads():
    lm, clean, corrupt = tiny(n_layers=3), prompts(), prompts(seed=1)
    same = path_patching(lm, lambda: lm(clean), lambda: lm(clean), last_logit_diff, (0, 0), [(2, 1)])
    assert same["effect"] == pytest.approx(0.0, abs=1e-6)
    moved = path_patching(lm, lambda: lm(clean), lambda: lm(corrupt), last_logit_diff, (0, 0), [(2, 1)])
    # step 3 by hand: only the receiver changes, to what it computes with the sender corrupted and
    # every other head (here: layer 1's, and head 0 of layers 0 and 2) frozen to its clean output
    _, c = capture(lm, lambda: lm(clean), [Site("heads", i) for i in range(3)])
    _, x = capture(lm, lambda: lm(corrupt), [Site("heads", 0)])
    frozen0 = c[Site("heads", 0)].clone()
    frozen0[:, :, 0] = x[Site("heads", 0)][:, :, 0]
    edits = {Site("heads", 0): replace_all(frozen0), Site("heads", 1): replace_all(c[Site("heads", 1)])}
    _, step2 = capture(lm, lambda: lm(clean), [Site("heads", 2)], edits)
    final = c[Site("heads", 2)].clone()
    final[:, :, 1] = step2[Site("heads", 2)][:, :, 1]
    by_hand = last_logit_diff(run_with(lm, lambda: lm(clean), {Site("heads", 2): replace_all(final)}))
    assert moved["patched"] == pytest.approx(by_hand.item(), abs=1e-5)
    assert moved["effect"] != 0


def test_gates_are_read_on_a_gated_mixer_and_linear_mixers_give_their_matrix():
    lm, idx = tiny("gated_softmax"), prompts()
    _, _, internals = lm(idx, return_internals=True)
    _, cache = capture(lm, lambda: lm(idx), [Site("gate", 0)])
    assert torch.equal(cache[Site("gate", 0)], internals["mixers"][0]["gate"])
    lin = tiny("gla")
    _, cache = capture(lin, lambda: lin(idx), [Site("attn", 1), Site("heads", 1)])
    assert cache[Site("attn", 1)].shape[-2:] == (7, 7)
    assert len(ModelLayers(lin)) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lm: hooked(lm, read=[Site("heads", 2)]).__enter__(), "past the model"),
        (lambda lm: hooked(lm, edits={Site("attn", 0): lambda x: x}).__enter__(), "read only"),
        (lambda lm: Site("heads", -1), "layer must be"),
        (lambda lm: Site("logits", 0), "kind must be"),
        (lambda lm: ModelLayers(torch.nn.Linear(2, 2)), "no gatelab mixer"),
        (lambda lm: ablation_scores(lm, lambda: lm(prompts()), last_logit_diff, mode="mean"), "reference"),
        (
            lambda lm: activation_patching(
                lm, lambda: lm(prompts()), lambda: lm(prompts(T=5)), last_logit_diff
            ),
            "same length",
        ),
        (
            lambda lm: path_patching(
                lm, lambda: lm(prompts()), lambda: lm(prompts()), last_logit_diff, (1, 0), [(0, 1)]
            ),
            "after the sender",
        ),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(tiny())


def test_an_edit_of_the_wrong_shape_is_refused():
    lm = tiny()
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        run_with(lm, lambda: lm(prompts()), {Site("heads", 0): lambda x: x[:, :1]})


def test_replacing_attention_with_the_models_own_map_changes_nothing():
    from gatelab.analysis import replace_attention

    lm, idx = tiny(), prompts()
    _, cache = capture(lm, lambda: lm(idx), [Site("attn", 1)])
    own = cache[Site("attn", 1)][:, [1]]  # (B, 1, T, T) head 1's probabilities
    got = replace_attention(lm, lambda: lm(idx), {1: ([1], own)})[0]
    torch.testing.assert_close(got, lm(idx)[0], rtol=0, atol=1e-5)
    # all mass on the first token: the head outputs the first position's value everywhere
    first = torch.zeros(7, 7)
    first[:, 0] = 1
    # hooks run in the order they were added: the read, added inside, sees the replaced head
    run = lambda: capture(lm, lambda: lm(idx), [Site("heads", 0)])  # noqa: E731
    _, seen = replace_attention(lm, run, {0: ([0], first)})
    assert torch.allclose(seen[Site("heads", 0)][:, :, 0], seen[Site("heads", 0)][:, :1, 0].expand(-1, 7, -1))
    with pytest.raises(TypeError, match="plain causal softmax"):
        gated = tiny("gated_softmax")
        replace_attention(gated, lambda: gated(idx), {0: ([0], first)})
