"""KV-cache policies: full-budget equivalence, what streaming and h2o keep, eviction, errors."""

import pytest
import torch

import gatelab
from gatelab.cache import MASKED, PolicyCache, apply_policy, cache_bytes, make_policy, remove_policy
from gatelab.cache.policies import with_key_bias
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.mixers import KVCache, KVCacheManager
from gatelab.mixers.softmax import SoftmaxAttention
from gatelab.ops.softmax import attention_probs, softmax
from gatelab.testing import assert_close

FAMILY = ["softmax", "gated_softmax", "clipped_softmax", "gated_heads"]


def build(key="softmax", **options):
    torch.manual_seed(0)
    return gatelab.make_mixer(key, d_model=64, n_heads=4, **options).eval()


def keep_everything(policy):
    """Saturate an attention gate to keep every token (its budget >= the sequence)."""
    torch.nn.init.zeros_(policy.gate.out.weight)
    torch.nn.init.zeros_(policy.gate.direct.weight)
    torch.nn.init.constant_(policy.gate.direct.bias, 30.0)
    return policy


FULL_BUDGET = {
    "full": {},
    "streaming": {"budget": 13},
    "streaming_pre_rope": {"budget": 1.0, "seq_len": 13},
    "h2o": {"budget": 13, "recent": 4},
    "attention_gate": {},
}


def policy_for(mixer, case):
    name = "streaming" if case.startswith("streaming") else case
    options = dict(FULL_BUDGET[case])
    if case == "streaming":
        options["rope_by_cache_position"] = False
    policy = make_policy(name, mixer, **options)
    return keep_everything(policy) if name == "attention_gate" else policy


def run_decode(mixer, x, prefix):
    y, state = mixer(x[:, :prefix])
    outs = [y]
    for t in range(prefix, x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state=state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("case", list(FULL_BUDGET))
@pytest.mark.parametrize("key", FAMILY)
def test_budget_covering_the_sequence_equals_full_attention(key, case):
    mixer = build(key, n_kv_heads=2) if key == "softmax" else build(key)
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        expected, _ = mixer(x)
        mixer.cache_policy = policy_for(mixer, case).eval()
        parallel, state = mixer(x)
        decoded, state = run_decode(mixer, x, 5)
    assert isinstance(state, PolicyCache) and state.k.shape[1] == 13
    assert_close(f"{key}/{case} parallel", parallel, expected, torch.float32)
    assert_close(f"{key}/{case} decode", decoded, expected, torch.float32)


@pytest.mark.parametrize("case", list(FULL_BUDGET))
def test_lm_logits_with_full_budget(case):
    model = LM(LMConfig(d_model=64, n_layers=2, n_heads=4, pattern="softmax,gated_softmax", seed=0)).eval()
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected, _ = model(idx)
        for block in model.blocks:
            block.mixer.cache_policy = policy_for(block.mixer, case).eval()
        parallel, _ = model(idx)
        logits, states = model(idx[:, :4])
        steps = [logits]
        for t in range(4, 11):
            logits, states = model(idx[:, t : t + 1], states)
            steps.append(logits)
    assert_close(f"{case} logits", parallel, expected, torch.float32)
    assert_close(f"{case} decode logits", torch.cat(steps, dim=1), expected, torch.float32)
    assert [layer["held"] for layer in cache_bytes(states)] == [2 * 2 * 11 * 4 * 16 * 4] * 2
    remove_policy(model)
    assert torch.equal(model(idx)[0], expected)


@pytest.mark.parametrize("rope_by_cache_position", [False, True])
def test_streaming_keeps_exactly_sinks_and_window(rope_by_cache_position):
    mixer = build()
    policy = make_policy(
        "streaming", mixer, budget=8, sinks=3, window=5, rope_by_cache_position=rope_by_cache_position
    )
    mixer.cache_policy = policy
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        decoded, state = run_decode(mixer, x, 1)
    expected_positions = torch.tensor([0, 1, 2, 15, 16, 17, 18, 19])
    assert torch.equal(state.positions, expected_positions.view(1, -1, 1).expand(2, -1, 4))
    assert state.k.shape == (2, 8, 4, 16) and state.nbytes == 2 * 2 * 8 * 4 * 16 * 4
    if not rope_by_cache_position:
        # each step saw the 3 sinks, the 5 previous tokens and itself: a sinks + (window + 1) mask
        reference = gatelab.make_mixer("sliding_window", d_model=64, n_heads=4, window=6, sinks=3)
        reference.load_state_dict({k: v for k, v in mixer.state_dict().items() if "cache_policy" not in k})
        with torch.no_grad():
            expected, _ = reference.eval()(x)
        assert_close("streaming decode vs sinks + window attention", decoded, expected, torch.float32)
    else:  # keys are cached un-rotated; queries and keys rotate by their slot in the cache
        assert not state.rope_applied


def test_h2o_scores_are_column_sums_of_attention():
    mixer = build(n_kv_heads=2)
    mixer.cache_policy = make_policy("h2o", mixer, budget=1.0, seq_len=9)
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        _, state, internals = mixer(x, return_internals=True)
        probs = internals["attn"]  # (B, H, T, S)
        expected = probs.view(3, 2, 2, 9, 9).sum(dim=(2, 3)).transpose(1, 2)  # (B, S, Hkv)
        assert_close("h2o scores (parallel)", state.scores, expected, torch.float32)
        _, state = run_decode(mixer, x, 1)  # the same sums, accumulated one query row at a time
    assert_close("h2o scores (decode)", state.scores, expected, torch.float32)


def test_h2o_evicted_token_is_never_attended_again():
    mixer = build(n_kv_heads=2)
    mixer.cache_policy = make_policy("h2o", mixer, budget=6, recent=3)
    x = torch.randn(2, 16, 64, requires_grad=True)
    state, kept_history = None, []
    for t in range(15):
        _, state = mixer(x[:, t : t + 1], state=state)
        kept_history.append(state.positions.clone())
        assert state.k.shape[1] == min(t + 1, 6)  # the cache never grows past the budget
    assert state.nbytes == 2 * 2 * 6 * 2 * 16 * 4
    y, _, internals = mixer(x[:, 15:16], state=state, return_internals=True)
    assert internals["attn"].shape == (2, 4, 1, 7)  # 6 kept keys + the new token
    y.sum().backward()
    visible = torch.zeros(2, 16, dtype=torch.bool)
    for b in range(2):
        visible[b, state.positions[b].flatten()] = True  # kept by at least one head
    visible[:, 15] = True
    grad_norm = x.grad.norm(dim=-1)  # (B, 16)
    assert (grad_norm[~visible] == 0).all()  # an evicted token's key and value are gone for good
    assert (grad_norm[visible] > 0).all()
    for b in range(2):  # once evicted, a token never comes back
        for h in range(2):
            gone = set()
            for kept in kept_history:
                now = set(kept[b, :, h].tolist())
                assert not (now & gone)
                gone |= set(range(max(now) + 1)) - now


def test_key_bias_channel_equals_additive_bias():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 65, 4, 60), torch.randn(3, 65, 2, 60), torch.randn(3, 65, 2, 60)
    bias = torch.randn(3, 65, 2)
    bias[:, 5:9, 1] = MASKED
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, dim=2)) * 60**-0.5
    scores = scores + bias.repeat_interleave(2, dim=2).permute(0, 2, 1)[:, :, None, :]
    scores = scores.masked_fill(~torch.ones(65, 65, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.repeat_interleave(2, dim=2))
    q2, k2 = with_key_bias(q, k, bias)
    assert_close("biased attention", softmax(q2, k2, v, backend="reference"), expected, torch.float32)
    assert (attention_probs(q2, k2)[:, 2:, 9:, 5:9] == 0).all()
    for dtype in (torch.bfloat16,):
        out = softmax(*with_key_bias(q.to(dtype), k.to(dtype), bias), v.to(dtype), backend="sdpa")
        assert_close("biased attention bf16", out.float(), expected, dtype)


def test_errors():
    mixer = build()
    for budget in (0, -3, 0.0, -0.5):
        with pytest.raises(ValueError, match="budget must be > 0"):
            make_policy("h2o", mixer, budget=budget, seq_len=10)
        with pytest.raises(ValueError, match="budget must be > 0"):
            make_policy("streaming", mixer, budget=budget, seq_len=10)
    with pytest.raises(ValueError, match="give seq_len"):
        make_policy("h2o", mixer, budget=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        make_policy("h2o", mixer, budget=1.5, seq_len=10)
    with pytest.raises(ValueError, match="larger than the budget"):
        make_policy("streaming", mixer, budget=8, sinks=4, window=6)
    with pytest.raises(ValueError, match="larger than the budget"):
        make_policy("h2o", mixer, budget=8, recent=9)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("lru", mixer)
    with pytest.raises(TypeError, match="without|KV cache"):
        make_policy("h2o", gatelab.make_mixer("gla", d_model=64, n_heads=4), budget=4)
    with pytest.raises(TypeError, match="manages its own KV cache"):
        make_policy("streaming", gatelab.make_mixer("sliding_window", d_model=64, n_heads=4), budget=4)
    model = LM(LMConfig(d_model=64, n_layers=2, n_heads=4, pattern="softmax,gla"))
    with pytest.raises(TypeError, match="KV cache"):
        apply_policy(model, "h2o", budget=4)
    assert all("cache_policy" not in b.mixer._modules for b in model.blocks)  # nothing half-applied
    mixer.cache_policy = make_policy("streaming", mixer, budget=4)
    _, plain = build()(torch.randn(1, 3, 64))
    with pytest.raises(TypeError, match="PolicyCache"):
        mixer(torch.randn(1, 1, 64), state=plain)


@pytest.mark.parametrize("case", ["h2o", "streaming_pre_rope", "attention_gate"])
def test_bf16_decode_against_fp32_full_attention(case):
    mixer = build("gated_softmax")
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        expected, _ = mixer(x)  # fp32, plain KV cache
        mixer.cache_policy = policy_for(mixer, case).eval()
        mixer.to(torch.bfloat16)
        decoded, _ = run_decode(mixer, x.to(torch.bfloat16), 5)
    assert_close(f"{case} bf16 decode", decoded.float(), expected, torch.bfloat16)


class OwnCacheAttention(SoftmaxAttention):
    """A mechanism that declares that its attention needs its own cache (as sliding_window does)."""

    accepts_cache_policy = False


def test_a_policy_applies_only_where_the_mechanism_declares_it_can():
    own = OwnCacheAttention(build().config)
    with pytest.raises(TypeError, match="OwnCacheAttention manages its own KV cache"):
        make_policy("h2o", own, budget=4)
    policy = make_policy("h2o", build(), budget=4)
    with pytest.raises(TypeError, match="manages its own KV cache"):
        own.set_cache_policy(policy)
    window = gatelab.make_mixer("sliding_window", d_model=64, n_heads=4, window=4)
    window.cache_policy = policy  # assigned past the checks: the forward still refuses it
    with pytest.raises(TypeError, match="SlidingWindowAttention manages its own KV cache"):
        window(torch.randn(1, 3, 64))


def test_a_state_of_another_cache_is_refused():
    mixer = build()
    with torch.no_grad():
        mixer.set_cache_policy(make_policy("streaming", mixer, budget=4))
        _, policy_state = mixer(torch.randn(1, 3, 64))
        mixer.set_cache_policy(None)
        with pytest.raises(TypeError, match="state must be the KVCache this mixer returned, got PolicyCache"):
            mixer(torch.randn(1, 1, 64), state=policy_state)
        mixer.set_cache_policy(make_policy("h2o", mixer, budget=4))
        with pytest.raises(ValueError, match="batch 2.*got a state of softmax .*batch 1"):
            mixer(torch.randn(2, 1, 64), state=policy_state)
        # the same shapes, another policy: a streaming cache holds no h2o scores, its slots mean other things
        with pytest.raises(
            ValueError, match="kept under cache policy 'streaming', this mixer runs policy 'h2o'"
        ):
            mixer(torch.randn(1, 1, 64), state=policy_state)


class RecentOnly(KVCacheManager, torch.nn.Module):
    """A cache written outside gatelab.cache: keep the last ``keep`` tokens after each call."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def evict(self, cache, probs):
        S = cache.k.shape[1]
        if S <= self.keep:
            return cache
        return KVCache(cache.k[:, S - self.keep :], cache.v[:, S - self.keep :], cache.length,
                       signature=cache.signature)  # fmt: skip


def test_any_cache_manager_plugs_into_the_one_forward():
    """The mixer's forward updates and evicts through whatever manager is plugged in: keeping the last
    3 tokens and decoding one token at a time is sliding-window attention over 4 tokens."""
    mixer = build()
    mixer.set_cache_policy(RecentOnly(3))
    reference = gatelab.make_mixer("sliding_window", d_model=64, n_heads=4, window=4, sinks=0).eval()
    reference.load_state_dict({k: v for k, v in mixer.state_dict().items() if "cache_policy" not in k})
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        decoded, state = run_decode(mixer, x, 1)
        expected, _ = reference(x)
    assert type(state) is KVCache and state.k.shape[1] == 3 and state.length == 11
    assert_close("recent-only decode vs sliding window", decoded, expected, torch.float32)


@pytest.mark.parametrize(
    "name, options, error, match",
    [
        ("streaming", {"budget": 4, "rope_by_cache_position": "no"}, TypeError, "rope_by_cache_position"),
        ("attention_gate", {"rope_by_cache_position": 1}, TypeError, "rope_by_cache_position"),
        ("h2o", {"budget": float("nan"), "seq_len": 10}, ValueError, "budget must be a finite number"),
        ("streaming", {"budget": float("inf")}, ValueError, "budget must be a finite number"),
        ("attention_gate", {"eviction_weight": float("nan")}, ValueError, "eviction_weight"),
        ("attention_gate", {"eviction_weight": -1.0}, ValueError, "eviction_weight"),
        ("attention_gate", {"eviction_weight": "4"}, TypeError, "eviction_weight"),
        ("attention_gate", {"init_keep": "0.9"}, TypeError, "init_keep"),
        ("attention_gate", {"init_keep": float("nan")}, ValueError, "init_keep"),
    ],
)
def test_policy_options_are_checked(name, options, error, match):
    with pytest.raises(error, match=match):
        make_policy(name, build(), **options)
