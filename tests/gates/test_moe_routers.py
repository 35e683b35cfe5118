"""MoE routers: the shared contract (shapes, ranges, capacity, balance loss, bad input) over every registered
router, and each router's limit that reduces it to its baseline."""

import math

import pytest
import torch

import gatelab
from gatelab.gates.moe import MoEMLP, make_router, router_keys
from gatelab.gates.moe.comet import leaf_paths, smooth_step
from gatelab.testing import assert_close, compare_grads

ROUTERS = router_keys()
D, E = 16, 4


def build(key, **options):
    torch.manual_seed(0)
    return make_router(key, d_model=D, n_experts=E, **options)


def test_every_router_is_registered_in_the_gate_family():
    assert set(ROUTERS) == {"topk", "comet", "dense_to_sparse", "aw_moe"}
    for key in ROUTERS:
        spec = gatelab.get(key)
        assert spec.family == "gate" and not spec.causal  # never offered as a decoder mixer
    assert {gatelab.get(k).status for k in ("dense_to_sparse", "aw_moe")} == {"experimental"}


@pytest.mark.parametrize("key", ROUTERS)
def test_shapes_and_ranges(key):
    router = build(key)
    out = router(torch.randn(37, D))
    assert out.weights.shape == out.probs.shape == out.mask.shape == (37, E)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, out.weights > 0)
    assert (out.weights >= 0).all() and (out.weights <= 1).all()
    assert_close(f"{key} weights sum", out.weights.sum(-1), torch.ones(37), torch.float32)
    assert_close(f"{key} probs sum", out.probs.sum(-1), torch.ones(37), torch.float32)
    assert 0 < out.stats["active_fraction"] <= 1 and out.stats["load_max_over_mean"] >= 1
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    k = router.config.k
    if key in ("topk", "aw_moe"):  # a fixed k
        assert (out.mask.sum(-1) == k).all()


@pytest.mark.parametrize("key", ROUTERS)
def test_gradients_reach_every_router_parameter(key):
    router = build(key).train()
    out = router(torch.randn(64, D))
    target = torch.randn(64, E)
    ((out.weights * target).sum() + out.aux_loss).backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{key}.{name}: no finite gradient"
        assert p.grad.abs().sum() > 0, f"{key}.{name}: zero gradient"


@pytest.mark.parametrize("key", ROUTERS)
def test_bad_inputs_raise_clear_errors(key):
    router = build(key)
    with pytest.raises(ValueError, match=r"\(N, d_model=16\).*got \(2, 5, 16\)"):
        router(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"got \(5, 8\)"):
        router(torch.randn(5, 8))
    with pytest.raises(TypeError, match="float tensor"):
        router(torch.ones(5, D, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"{key}: k must be in \[1, n_experts=4\].*got 5"):
        make_router(key, d_model=D, n_experts=E, k=5)
    if key != "dense_to_sparse":  # the one router without a fixed number of experts
        with pytest.raises(ValueError, match=rf"{key}: k must be an int in \[1, n_experts\], got None"):
            make_router(key, d_model=D, n_experts=E, k=None)
    with pytest.raises(ValueError, match=rf"{key}: capacity_factor must be > 0"):
        make_router(key, d_model=D, n_experts=E, capacity_factor=0.0)
    with pytest.raises(TypeError, match=rf"{key}: option 'n_experts' must be an int"):
        make_router(key, d_model=D, n_experts=4.0)


def test_unknown_router_is_refused_listing_the_routers():
    with pytest.raises(ValueError, match="unknown MoE router 'softmax'; routers: aw_moe, comet"):
        make_router("softmax", d_model=D)


@pytest.mark.parametrize("key", ROUTERS)
def test_capacity_drops_the_later_assignments_and_counts_them(key):
    x = torch.randn(40, D)
    free = build(key)(x)
    router = build(key, capacity_factor=0.5)
    out = router(x)
    capacity = math.ceil(0.5 * int(free.mask.sum()) / E)
    assert (out.mask.sum(0) <= capacity).all()
    assert not (out.mask & ~free.mask).any()  # nothing is added, only dropped
    dropped = (free.mask & ~out.mask).sum() / free.mask.sum()
    assert out.stats["dropped_fraction"] == pytest.approx(float(dropped))
    for e in range(E):  # per expert, the kept ones are its first `capacity` tokens
        rows = free.mask[:, e].nonzero().squeeze(-1)
        assert torch.equal(out.mask[:, e].nonzero().squeeze(-1), rows[:capacity])
    assert torch.equal(out.weights, free.weights * out.mask)  # kept weights are not renormalised


def test_balance_loss_is_the_weight_under_uniform_routing():
    router = build("topk", k=1, balance_weight=0.5)
    with torch.no_grad():
        router.proj.weight.zero_()  # uniform probabilities; top-1 ties spread by index below
    out = router(torch.randn(8, D))
    share = out.mask.sum(0).float() / 8
    assert out.aux["balance"].item() == pytest.approx(0.5 * E * float((share * 0.25).sum()))
    assert build("topk", balance_weight=0.0)(torch.randn(8, D)).aux == {}


# --- limits that reduce a router to its baseline ------------------------------------------------------


def test_topk_with_every_expert_is_the_dense_softmax():
    router = build("topk", k=E)
    x = torch.randn(20, D)
    out = router(x)
    assert_close("top-E weights", out.weights, torch.softmax(router.proj(x), -1), torch.float32)


def test_smooth_step_values_and_gradient_band():
    t = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0], requires_grad=True)
    s = smooth_step(t, gamma=1.0)
    expected = [0.0, 0.0, -2 * (-0.25) ** 3 + 1.5 * (-0.25) + 0.5, 0.5, -2 * 0.25**3 + 0.375 + 0.5, 1.0, 1.0]
    assert s.tolist() == pytest.approx(expected)
    s.sum().backward()
    assert t.grad[[0, 1, 5, 6]].abs().sum() == 0 and (t.grad[[2, 3, 4]] > 0).all()  # only in the band


def test_comet_trees_reach_every_leaf_with_total_probability_one():
    assert leaf_paths(4).tolist() == [[1, 1, 0], [1, -1, 0], [-1, 0, 1], [-1, 0, -1]]
    for n_experts in (1, 3, 4, 5, 8):
        router = make_router("comet", d_model=D, n_experts=n_experts, k=1)
        with torch.no_grad():
            router.nodes.normal_()
        reach = router.reach(torch.randn(9, D))  # (N, E, k)
        assert reach.shape == (9, n_experts, 1)
        assert_close(f"comet E={n_experts} reach", reach.sum(1), torch.ones(9, 1), torch.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_comet_with_saturated_nodes_selects_at_most_k_experts(k):
    router = make_router("comet", d_model=D, n_experts=8, k=k, gamma=0.01)
    with torch.no_grad():
        router.nodes.normal_().mul_(100)  # |w . x| >> gamma / 2: every node is 0 or 1
    x = torch.randn(50, D)
    out = router(x)
    assert (out.mask.sum(-1) <= k).all() and (out.mask.sum(-1) >= 1).all()
    reach = router.reach(x)
    assert ((reach == 0) | (reach == 1)).all()
    assert out.aux["entropy"].item() == pytest.approx(0.0, abs=1e-9)  # saturated trees have no entropy
    if k == 1:  # one tree reaching one leaf: a hard choice
        assert torch.equal(out.weights, out.mask.float())


def test_dense_to_sparse_temperature_anneals_and_counts_training_forwards():
    router = build("dense_to_sparse", tau_start=2.0, tau_end=0.5, anneal_steps=4)
    assert [router.temperature(s) for s in (0, 2, 4, 9)] == pytest.approx([2.0, 1.0, 0.5, 0.5])
    x = torch.randn(6, D)
    router.eval()
    router(x)
    assert int(router.steps) == 0  # evaluation does not advance the schedule
    router.train()
    for _ in range(3):
        router(x)
    assert int(router.steps) == 3 and router.temperature() == pytest.approx(2.0 * 0.25**0.75)
    assert "steps" in router.state_dict()  # saved with the model


def test_dense_to_sparse_identity_without_pruning_is_the_tempered_softmax():
    router = build("dense_to_sparse", activation="identity", prune_below=0.0, tau_start=0.7, tau_end=0.7)
    x = torch.randn(12, D)
    assert_close("identity gate", router(x).weights, torch.softmax(router.proj(x) / 0.7, -1), torch.float32)


def test_dense_to_sparse_is_dense_when_hot_and_one_hot_when_cold():
    x = torch.randn(30, D)
    hot = build("dense_to_sparse", tau_start=100.0, tau_end=100.0)(x)
    assert hot.mask.all()
    cold_router = build("dense_to_sparse", tau_start=1e-3, tau_end=1e-3)
    cold = cold_router(x)
    assert (cold.mask.sum(-1) == 1).all()
    assert torch.equal(cold.weights.argmax(-1), cold_router.proj(x).argmax(-1))


def test_aw_moe_with_a_constant_activation_unit_is_the_softmax_top_k():
    aw = build("aw_moe", k=2)
    baseline = build("topk", k=2)
    with torch.no_grad():
        aw.out.weight.zero_()  # a_e = sigmoid(b2) for every expert
        baseline.proj.weight.copy_(aw.gate.weight)
    x = torch.randn(25, D)
    assert_close("aw_moe -> topk", aw(x).weights, baseline(x).weights, torch.float32)
    a = aw.activation(x)
    assert a.shape == (25, E) and ((a > 0) & (a < 1)).all()


# --- the MoE MLP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 0.75])
@pytest.mark.parametrize("key", ROUTERS)
def test_moe_mlp_sparse_path_equals_the_dense_reference(key, capacity):
    torch.manual_seed(0)
    sparse = MoEMLP(D, 8, E, key, {"capacity_factor": capacity}, path="sparse")
    dense = MoEMLP(D, 8, E, key, {"capacity_factor": capacity}, path="dense")
    dense.load_state_dict(sparse.state_dict())
    params = dict(sparse.named_parameters())

    def run(mlp):
        def call(inputs):
            out = torch.func.functional_call(mlp, {k: inputs[k] for k in params}, (inputs["x"],))
            return out, mlp.last.aux_loss

        return call

    tensors = {
        "x": torch.randn(3, 7, D, requires_grad=True),
        **{k: v.detach().clone() for k, v in params.items()},
    }
    for v in tensors.values():
        v.requires_grad_(True)
    compare_grads(tensors, run(sparse), run(dense), torch.float32)


def test_moe_mlp_with_one_expert_is_a_swiglu():
    from gatelab.lab.models.lm import SwiGLU

    moe = MoEMLP(D, 8, 1, "topk", {"k": 1})
    swiglu = SwiGLU(D, 8)
    with torch.no_grad():
        swiglu.gate_up.weight.copy_(moe.gate_up[0].T)
        swiglu.down.weight.copy_(moe.down[0].T)
    x = torch.randn(2, 5, D)
    assert_close("one expert", moe(x), swiglu(x), torch.float32)


def test_moe_mlp_bad_input():
    mlp = MoEMLP(D, 8, E, "topk")
    with pytest.raises(ValueError, match=r"\(B, T, d_model\), got \(5, 16\)"):
        mlp(torch.randn(5, D))
    with pytest.raises(ValueError, match="path must be one of 'sparse', 'dense'"):
        MoEMLP(D, 8, E, "topk", path="gather")
    with pytest.raises(ValueError, match="n_experts must be a positive int"):
        MoEMLP(D, 8, 0, "topk")
