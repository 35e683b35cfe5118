"""Flux Attention: a forced route is exactly softmax / the sparse mechanism; the route is per sequence,
decided at prefill and kept in decoding; the straight-through Gumbel forward is hard and its gradient is not
zero; the budget loss and its target; the tau schedule; FLOP counts; bad options."""

import math

import pytest
import torch

import gatelab
from gatelab.routers.flops import attention_flops, visible_keys
from gatelab.routers.flux import (
    budget_loss,
    pool_queries,
    sparse_fraction,
    straight_through_gumbel,
    tau_at,
)
from gatelab.testing import assert_close

OPTIONS = {"d_model": 32, "n_heads": 4, "window": 4, "sinks": 1, "pool_size": 2}
SPARSE_OPTIONS = {
    "sliding_window": {"window": 4, "sinks": 1},
    "hip": {"window": 4, "sinks": 1},
    "psa": {},
}


def _flux(**overrides):
    torch.manual_seed(0)
    return gatelab.make_mixer("flux", **{**OPTIONS, **overrides}).eval()


def _same_weights(flux, key, **options):
    other = gatelab.make_mixer(key, d_model=32, n_heads=4, **options).eval()
    missing, unexpected = other.load_state_dict(flux.state_dict(), strict=False)
    assert not missing and all(k.startswith(("router.", "steps_seen")) for k in unexpected)
    return other


def _route_to(flux, side: str):
    """Set the router so that every sequence picks ``side`` at inference (argmax of the logits)."""
    with torch.no_grad():
        flux.router.mlp[-1].bias.copy_(torch.tensor([5.0, 0.0] if side == "sparse" else [0.0, 5.0]))


@pytest.mark.parametrize("sparse", ["sliding_window", "hip", "psa"])
@pytest.mark.parametrize("mode", ["forced", "routed"])
def test_full_side_is_softmax_and_sparse_side_is_the_sparse_mechanism_exactly(sparse, mode):
    x = torch.randn(2, 19, 32)
    for side, key, options in (("full", "softmax", {}), ("sparse", sparse, SPARSE_OPTIONS[sparse])):
        flux = _flux(sparse=sparse, route=side if mode == "forced" else "learned", **SPARSE_OPTIONS[sparse])
        if mode == "routed":
            _route_to(flux, side)
        with torch.no_grad():
            y, _, internals = flux(x, return_internals=True)
            expected, _ = _same_weights(flux, key, **options)(x)
        assert torch.equal(y, expected), f"{side} side of flux[{sparse}] is not {key}"
        assert internals["route"]["unit"] == "layers"
        assert float(internals["route"]["expensive_fraction"]) == (1.0 if side == "full" else 0.0)


@pytest.mark.parametrize("route", ["full", "sparse"])
def test_forced_route_is_causal_and_decodes_as_the_parallel_pass(route):
    flux = _flux(route=route)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        y, _ = flux(x)
        x2 = x.clone()
        x2[:, 8:] = torch.randn(2, 5, 32)
        assert torch.equal(flux(x2)[0][:, :8], y[:, :8])  # no lookahead
        y_prefix, state = flux(x[:, :6])
        steps = [y_prefix] + [None] * 7
        for t in range(6, 13):
            steps[t - 5], state = flux(x[:, t : t + 1], state)
    assert_close(f"flux[route={route}] decode", torch.cat(steps, dim=1), y, torch.float32)


def test_route_is_decided_at_prefill_and_kept_in_decoding():
    """The learned route: per sequence, from the prefill's queries; decoding keeps it (the state carries
    it), and then equals the parallel pass whenever that pass takes the same route."""
    flux = _flux()
    with torch.no_grad():  # a router that reads the pooled queries: some sequences full, some sparse
        torch.manual_seed(1)
        flux.router.mlp[-1].weight.normal_(std=5.0)
        flux.router.mlp[-1].bias.zero_()
    torch.manual_seed(2)
    x = torch.randn(16, 13, 32)
    with torch.no_grad():  # the bias at the batch's median margin: half of the sequences on each side
        from gatelab.routers.flux import pool_queries as pool

        q = flux.q_proj(x).view(16, 13, 4, 8)
        logits = flux.router(pool(q, flux.config.pool_size))
        flux.router.mlp[-1].bias[1] = -(logits[:, 1] - logits[:, 0]).median() + 1e-4

        y, _, internals = flux(x, return_internals=True)
        z = internals["route"]["z"]
        assert 0 < float(z.mean()) < 1, "the test needs both sides in the batch"
        _, state = flux(x[:, :6])
        prefill_route = state.route.clone()
        steps = [flux(x[:, :6])[0]]
        for t in range(6, 13):
            y_t, state, step_internals = flux(x[:, t : t + 1], state, return_internals=True)
            assert torch.equal(step_internals["route"]["z"], prefill_route)  # kept, not re-decided
            steps.append(y_t)
        decoded = torch.cat(steps, dim=1)
    same = prefill_route == z
    assert same.any()
    assert_close("flux decode (same route)", decoded[same], y[same], torch.float32)
    # one sequence's route does not depend on the others in the batch
    with torch.no_grad():
        alone = flux(x[:1], return_internals=True)[2]["route"]["z"]
    assert torch.equal(alone, z[:1])


def test_learned_route_reads_the_whole_prefill():
    """The documented exception to causality: the route pools the first and last queries of the prefill, so
    changing the last tokens may flip a sequence's route and with it the outputs of its earlier tokens; the
    outputs given a route stay causal (the forced-route test)."""
    flux = _flux()
    torch.manual_seed(3)
    x = torch.randn(32, 9, 32)
    later = x.clone()
    later[:, -2:] = torch.randn(32, 2, 32)
    with torch.no_grad():
        flux.router.mlp[-1].weight.normal_(std=5.0)
        flux.router.mlp[-1].bias.zero_()
        q = flux.q_proj(x).view(32, 9, 4, 8)
        logits = flux.router(pool_queries(q, flux.config.pool_size))
        margins = (logits[:, 1] - logits[:, 0]).sort().values
        flux.router.mlp[-1].bias[1] = -(margins[15] + margins[16]) / 2  # half of the sequences each side
        y, _, a = flux(x, return_internals=True)
        y2, _, b = flux(later, return_internals=True)
    flipped = a["route"]["z"] != b["route"]["z"]
    assert flipped.any()
    assert not torch.allclose(y[flipped, :7], y2[flipped, :7])
    assert torch.equal(y[~flipped, :7], y2[~flipped, :7])


def test_straight_through_forward_is_hard_and_gradient_is_not_zero():
    logits = torch.randn(64, 2, requires_grad=True)
    z = straight_through_gumbel(logits, tau=1.5, generator=torch.Generator().manual_seed(0))
    assert set(z.detach().tolist()) <= {0.0, 1.0} and 0 < float(z.detach().mean()) < 1
    (z * torch.arange(64.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    # in the layer: the forward mixes with hard z, the router gets the gradient (full - sparse)
    flux = _flux().train()
    x = torch.randn(4, 9, 32)
    y, _, internals = flux(x, return_internals=True)
    assert set(internals["route"]["z"].tolist()) <= {0.0, 1.0}
    y.square().sum().backward()
    assert flux.router.mlp[-1].weight.grad.abs().sum() > 0


def test_starts_on_full_attention_and_argmax_at_inference():
    flux = _flux()
    with torch.no_grad():
        _, _, internals = flux(torch.randn(5, 7, 32), return_internals=True)
    assert torch.equal(internals["route"]["z"], torch.ones(5))


def test_tau_schedule_is_a_cosine_from_1_5_to_1_over_the_anneal_steps():
    assert tau_at(0, 10) == 1.5 and tau_at(10, 10) == 1.0 and tau_at(99, 10) == 1.0 and tau_at(0, 0) == 1.0
    assert math.isclose(tau_at(5, 10), 1.25)
    flux = _flux(anneal_steps=3).train()
    for _ in range(2):
        flux(torch.randn(1, 4, 32))
    assert int(flux.steps_seen) == 2
    flux.eval()(torch.randn(1, 4, 32))
    assert int(flux.steps_seen) == 2  # only training calls advance it


def test_pool_is_first_and_last_positions_then_heads():
    q = torch.randn(2, 10, 3, 4)
    expected = torch.cat([q[:, :2], q[:, -2:]], dim=1).mean(dim=(1, 2))
    assert_close("pool", pool_queries(q, 2), expected, torch.float32)
    assert_close("pool short", pool_queries(q, 5), q.mean(dim=(1, 2)), torch.float32)


def test_budget_loss_is_the_papers_penalty_on_the_sparse_fraction():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        [
            gatelab.make_mixer("flux", **OPTIONS, budget_target=0.5, budget_weights=(1.0, 2.0))
            for _ in range(4)
        ]
    )
    for layer, z in zip(layers, ([1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0])):
        layer.last_route = torch.tensor(z, requires_grad=True)
    s = sparse_fraction(layers)
    assert torch.equal(s, torch.tensor([0.25, 0.75]))  # per sequence: fraction of layers on the sparse side
    gap = s - 0.5
    assert_close("budget", budget_loss(layers), (gap.abs() + 2 * gap.square()).mean(), torch.float32)
    budget_loss(layers).backward()
    assert all(layer.last_route.grad is not None for layer in layers)
    # forced layers carry no budget
    forced = torch.nn.ModuleList([gatelab.make_mixer("flux", **OPTIONS, route="sparse")])
    forced[0](torch.randn(1, 3, 32))
    assert float(budget_loss(forced)) == 0.0


def test_trained_with_a_budget_the_router_moves_to_the_sparse_side():
    """Router-only training (frozen attention) with the budget as an extra loss: the budget is respected."""
    torch.manual_seed(0)
    flux = gatelab.make_mixer("flux", **OPTIONS, budget_target=1.0, budget_weights=(1.0, 1.0), anneal_steps=0)
    for name, p in flux.named_parameters():
        p.requires_grad = name.startswith("router.")
    opt = torch.optim.Adam([p for p in flux.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 9, 32)
    for _ in range(60):
        flux(x)
        loss = budget_loss(torch.nn.ModuleList([flux]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, _, internals = flux.eval()(x, return_internals=True)
    assert float(internals["route"]["expensive_fraction"]) == 0.0


def test_flops_follow_the_measured_route():
    flux = _flux(window=4, sinks=1)
    full, sparse = _flux(route="full"), _flux(route="sparse")
    for m in (full, sparse):
        with torch.no_grad():
            m(torch.randn(1, 16, 32))
    assert full.flops_per_token(16) > sparse.flops_per_token(16)
    projections = 2 * 4 * 32 * 32
    assert full.flops_per_token(16) == projections + 4 * 32 * 8.5  # (L + 1) / 2 keys
    assert flux.flops_per_token(16) > full.flops_per_token(16)  # unmeasured: full, plus the router
    config = full.sparse.config
    assert visible_keys("sliding_window", config, 3) == (1 + 2 + 3) / 3
    assert attention_flops("sliding_window", config, 16) == 4 * 32 * visible_keys(
        "sliding_window", config, 16
    )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sparse": "softmax"}, "sparse must be one of"),
        ({"route": "always"}, "route must be one of"),
        ({"budget_target": 1.5}, r"budget_target must be in \[0, 1\]"),
        ({"budget_weights": (1.0,)}, "budget_weights must be two numbers"),
        ({"budget_weights": (1.0, -1.0)}, "budget_weights must be two numbers"),
        ({"pool_size": 0}, "pool_size must be a positive int"),
        ({"causal": False}, "causal"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        gatelab.make_mixer("flux", **{**OPTIONS, **options})


def test_bad_shapes_and_a_foreign_state():
    flux = _flux()
    with pytest.raises(ValueError, match=r"x must have shape"):
        flux(torch.randn(2, 5, 31))
    _, state = gatelab.make_mixer("softmax", d_model=32, n_heads=4)(torch.randn(2, 5, 32))
    with pytest.raises(TypeError, match="FluxCache"):
        flux(torch.randn(2, 1, 32), state)
    with pytest.raises(TypeError, match="manages its own KV cache"):
        flux.check_accepts_policy()


def test_router_only_finetuning_through_the_trainer_keeps_the_model_frozen():
    """The paper's setting: a model's attention frozen, only the routers train, with the budget as an extra
    loss (the trainer's default terms for a model with learned Flux layers)."""
    from gatelab.lab.models.lm import LM, LMConfig
    from gatelab.lab.tasks import make_task
    from gatelab.lab.train import TrainConfig, train
    from gatelab.routers.flux import router_groups

    options = {"flux": {"window": 2, "sinks": 1, "pool_size": 2, "budget_target": 1.0}}
    model = LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, pattern="flux",
                        mixer_options=options, seed=0))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(steps=3, batch_size=4, warmup=1, eval_every=3, eval_batches=1, progress=False)
    result = train(model, make_task("mqar", vocab_size=40, seq_len=16, num_kv_pairs=2), config,
                   groups=router_groups(model, lr=1e-2))  # fmt: skip
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".router." in n for n in changed)
    rows = [r for r in result.history if r.get("split") == "train"]
    assert all("flux_budget" in r and "sparse_layers" in r for r in rows)
    with pytest.raises(ValueError, match="learned Flux layers"):
        router_groups(torch.nn.Linear(2, 2))
