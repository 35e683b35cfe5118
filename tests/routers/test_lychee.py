"""LycheeDecode: all-retrieval is softmax attention, sparse heads see only the retrieval heads' top-k, decode
== parallel, HardKuma closed forms, the eval partition and its budget, the L0 Lagrangian, bad options."""

import pytest
import torch

import gatelab
from gatelab.cache import CachePolicy, make_policy
from gatelab.routers.lychee import hardkuma_l0, hardkuma_sample, lychee_l0_loss
from gatelab.testing import assert_close


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("lychee", **{"d_model": 32, "n_heads": 4, "budget": 3, **options}).eval()


def as_softmax(mixer):
    plain = gatelab.make_mixer("softmax", d_model=32, n_heads=4, n_kv_heads=mixer.config.n_kv_heads).eval()
    state = {k: v for k, v in mixer.state_dict().items() if not k.startswith(("log_", "l0_"))}
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("options", [{"route": "retrieval"}, {"route": "sparse", "budget": 64}])
def test_all_retrieval_or_a_budget_over_the_length_is_softmax_attention(options):
    mixer = build(**options)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert_close("lychee", mixer(x)[0], as_softmax(mixer)(x)[0], torch.float32)


def test_sparse_heads_attend_to_the_retrieval_heads_top_k():
    mixer = build(n_kv_heads=2, route="learned")
    with torch.no_grad():
        mixer.log_alpha.copy_(torch.tensor([1.0, -1.0]))  # head 0 retrieves (E[z] > 0.5), head 1 is sparse
    assert mixer.retrieval().tolist() == [True, False]
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        _, _, internals = mixer(x, return_internals=True)
    attn, selected = internals["attn"], internals["selected"]  # (B, H, T, S), (B, T, S)
    assert (selected.sum(-1) <= 3).all() and (selected.sum(-1)[:, 3:] == 3).all()  # the budget
    retrieval, sparse = attn[:, :2], attn[:, 2:]  # query heads 0, 1 share KV head 0
    score = retrieval.mean(1)
    top = score.masked_fill(torch.ones(10, 10).triu(1).bool(), -1).topk(3, -1).indices
    expected = torch.zeros_like(selected).scatter(-1, top, True) & torch.ones(10, 10).tril().bool()
    assert torch.equal(selected, expected)
    assert ((sparse > 0) <= selected[:, None]).all()  # nothing outside the selection
    assert_close("rows", sparse.sum(-1), torch.ones_like(sparse.sum(-1)), torch.float32)
    assert float(internals["route"]["expensive_fraction"]) == 0.5 and internals["route"]["unit"] == "heads"


def test_decode_matches_parallel_with_both_kinds_of_heads():
    mixer = build(n_kv_heads=2)
    with torch.no_grad():
        mixer.log_alpha.copy_(torch.tensor([1.0, -1.0]))
        x = torch.randn(2, 15, 32)
        y, _ = mixer(x)
        outs = [mixer(x[:, :5])[0]]
        _, state = mixer(x[:, :5])
        for t in range(5, 15):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            outs.append(y_t)
    assert_close("decode", torch.cat(outs, 1), y, torch.float32)


def test_hardkuma_closed_forms():
    torch.manual_seed(0)
    la, lb = torch.tensor(0.7).log(), torch.tensor(1.3).log()
    z = hardkuma_sample(la, lb, -0.1, 1.1, torch.rand(400_000).clamp(1e-6, 1 - 1e-6))
    x0, x1 = 0.1 / 1.2, 1.1 / 1.2
    F = lambda t: 1 - (1 - t**0.7) ** 1.3
    for empirical, closed in (((z == 0).float().mean(), F(x0)), ((z == 1).float().mean(), 1 - F(x1))):
        assert abs(float(empirical) - closed) < 4 * (closed * (1 - closed) / 400_000) ** 0.5 + 1e-4
    la.requires_grad_()
    l0 = hardkuma_l0(la, lb, -0.1, 1.1)
    assert abs(float(l0.detach()) - (1 - F(x0))) < 1e-6
    l0.backward()
    assert la.grad.abs() > 0
    assert abs(float(build().expected_gate().detach()[0]) - 0.5) < 1e-6  # alpha = beta = 1: symmetric


def test_eval_partition_budget_and_training_gradient():
    mixer = build()
    assert mixer.retrieval().tolist() == [True, False, False, False]  # none over 0.5: the largest retrieves
    with torch.no_grad():
        mixer.log_alpha.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    assert mixer.retrieval().tolist() == [True, True, True, False]
    capped = build(max_retrieval_heads=2)
    capped.load_state_dict(mixer.state_dict())
    assert capped.retrieval().tolist() == [True, True, False, False]
    assert set(mixer.gate().tolist()) <= {0.0, 1.0}  # eval: hard
    mixer.train()
    y, _ = mixer(torch.randn(2, 9, 32))
    y.square().mean().backward()
    assert mixer.log_alpha.grad.abs().max() > 0 and mixer.log_beta.grad.abs().max() > 0


def test_l0_lagrangian_and_its_multiplier():
    mixer = build(target_density=0.25).train()
    before = float(mixer.l0_multiplier)
    loss = lychee_l0_loss(mixer)  # E[L0] = 1 - 1/12 > 0.25: the multiplier grows, the loss pushes z down
    assert float(mixer.l0_multiplier) > before and float(loss.detach()) > 0
    loss.backward()
    assert (mixer.log_alpha.grad > 0).all()  # a larger alpha moves mass away from 0
    assert lychee_l0_loss(gatelab.make_mixer("softmax", d_model=32, n_heads=4)) == 0.0


def test_bad_options():
    for options, match in (({"budget": 0}, "budget"), ({"max_retrieval_heads": 5}, "max_retrieval_heads"),
                           ({"target_density": 1.5}, "target_density"), ({"kuma_low": 0.1}, "kuma_low"),
                           ({"route": "all"}, "route"), ({"causal": False}, "causal"), ({"backend": "sdpa"}, "backend")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            build(**options)
    with pytest.raises(TypeError, match="own KV cache"):
        build().set_cache_policy(CachePolicy())


def test_policy_decode_step_is_the_mixers_hybrid_heads():
    """The policy form on a plain softmax mixer: a decoding step equals the learnt mixer's last position with
    the same retrieval head (KV head 0); the prefill is dense, as in the paper."""
    lychee = build(n_kv_heads=2)
    with torch.no_grad():
        lychee.log_alpha.copy_(torch.tensor([1.0, -1.0]))
    plain = as_softmax(lychee)
    policy = make_policy("lychee", plain, budget=3, retrieval_heads=(0,))
    plain.set_cache_policy(policy)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        y_prefill, state = plain(x[:, :11])
        assert policy.last_selected is None  # dense prefill
        assert_close("prefill", y_prefill, as_softmax(lychee)(x[:, :11])[0], torch.float32)
        y_step, state = plain(x[:, 11:], state=state)
        expected, _ = lychee(x)
    assert_close("step", y_step, expected[:, 11:], torch.float32)
    assert (policy.last_selected.sum(-1) == 3).all() and state.k.shape[1] == 12  # the cache keeps all


def test_policy_all_retrieval_or_correction_steps_are_dense_and_bad_options_fail():
    plain = gatelab.make_mixer("softmax", d_model=32, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        y_full, _ = plain(x)
        for options in ({"retrieval_heads": 2}, {"retrieval_heads": (1,), "correction_every": 8}):
            plain.set_cache_policy(make_policy("lychee", plain, budget=2, **options))
            _, state = plain(x[:, :8])
            y_step, _ = plain(x[:, 8:], state=state)  # position 8: a correction step
            assert_close("dense step", y_step, y_full[:, 8:], torch.float32)
    for options, error in (({"budget": 0}, ValueError), ({"budget": 2, "retrieval_heads": 3}, ValueError),
                           ({"budget": 2, "retrieval_heads": (0, 0)}, ValueError),
                           ({"budget": 2, "retrieval_heads": "0"}, TypeError),
                           ({"budget": 2, "correction_every": 0}, ValueError)):  # fmt: skip
        with pytest.raises(error, match="budget|retrieval_heads|correction_every"):
            make_policy("lychee", plain, **options)


def test_the_trainer_adds_the_l0_term_of_a_model_with_lychee_layers():
    from gatelab.lab.train.groups import default_terms

    losses, _ = default_terms(torch.nn.Sequential(build()))
    assert losses["lychee_l0"] is lychee_l0_loss
    assert "lychee_l0" not in default_terms(torch.nn.Sequential(as_softmax(build())))[0]
