"""Sliding window + sinks: every backend against the fp32 reference and against the softmax op with the
same window; the mixer decodes token by token with a cache of sinks + window - 1 keys."""

import pytest
import torch

import gatelab
from gatelab import ops
from gatelab.ops.common.masks import attention_mask
from gatelab.ops.sliding_window.flex import sliding_window_block_mask
from gatelab.testing import assert_close, compare_grads

SHAPES = [
    # (B, Tq, S, H, Hkv, D, window, sinks)
    (3, 1, 1, 2, 2, 8, 1, 0),
    (2, 63, 63, 4, 2, 60, 16, 4),
    (1, 65, 65, 2, 1, 16, 7, 0),
    (2, 1, 65, 4, 4, 16, 9, 3),  # decoding: one query at the end of the cache
    (1, 5, 40, 2, 2, 32, 64, 2),  # window longer than the sequence
]


def _inputs(B, Tq, S, H, Hkv, D):
    return {"q": torch.randn(B, Tq, H, D), "k": torch.randn(B, S, Hkv, D), "v": torch.randn(B, S, Hkv, D)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[1]}S{s[2]}w{s[6]}s{s[7]}")
def test_backends_match_reference(shape, dtype):
    B, Tq, S, H, Hkv, D, window, sinks = shape
    x = _inputs(B, Tq, S, H, Hkv, D)

    def run(backend):
        return lambda t: ops.sliding_window(
            t["q"], t["k"], t["v"], window=window, sinks=sinks, backend=backend
        )

    # sdpa has a backward on CPU: outputs and every gradient
    grads = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    compare_grads(grads, run("sdpa"), run("reference"), dtype)
    # flex is forward-only on CPU (eager flex here; the compiled kernel runs in the benchmark)
    ref = run("reference")(x)
    o = run("flex")({n: t.to(dtype) for n, t in x.items()})
    assert o.dtype == dtype
    assert_close("flex", o.float(), ref, dtype)


def test_equals_softmax_with_window():
    x = _inputs(2, 33, 33, 2, 2, 16)
    o = ops.sliding_window(x["q"], x["k"], x["v"], window=5, sinks=2, backend="reference")
    want = ops.softmax(x["q"], x["k"], x["v"], causal=True, window=5, sinks=2, backend="reference")
    torch.testing.assert_close(o, want)


def test_flex_block_mask_agrees_with_dense_mask():
    for Tq, S, window, sinks in [(200, 200, 50, 4), (3, 300, 130, 0), (129, 129, 1, 1)]:
        bm = sliding_window_block_mask(Tq, S, window, sinks, "cpu", block_size=32)
        dense = attention_mask(Tq, S, causal=True, window=window, sinks=sinks)
        blocks = bm.to_dense()[0, 0].bool()  # (n_q_blocks, n_kv_blocks): visited blocks
        padded = torch.zeros(blocks.shape[0] * 32, blocks.shape[1] * 32, dtype=torch.bool)
        padded[:Tq, :S] = dense
        needed = padded.view(blocks.shape[0], 32, blocks.shape[1], 32).any(dim=(1, 3))
        assert torch.equal(blocks, needed), (Tq, S, window, sinks)  # every needed block, nothing more


def test_errors():
    x = _inputs(1, 8, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="window"):
        ops.sliding_window(x["q"], x["k"], x["v"], window=0)
    with pytest.raises(ValueError, match="sinks"):
        ops.sliding_window(x["q"], x["k"], x["v"], window=4, sinks=-1)
    with pytest.raises(ValueError, match="at least as many keys"):
        ops.sliding_window(x["q"], x["k"][:, :4], x["v"][:, :4], window=4)
    q = x["q"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        ops.sliding_window(q, x["k"], x["v"], window=4, backend="flex")


def test_mixer_decodes_with_a_bounded_cache():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer(
        "sliding_window", d_model=32, n_heads=2, n_kv_heads=1, window=5, sinks=2
    ).eval()
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        y_full, cache = mixer(x)
        y, state = mixer(x[:, :3])
        steps, held = [y], []
        for t in range(3, 30):
            y_t, state = mixer(x[:, t : t + 1], state=state)
            steps.append(y_t)
            held.append(state.k.shape[1])
    assert_close("decode", torch.cat(steps, 1), y_full, torch.float32)
    assert max(held) == 2 + 5 - 1 and state.length == 30
    assert cache.nbytes == state.nbytes == mixer.cache_bytes(batch=2)
    # a window of one keeps only the sinks
    mixer = gatelab.make_mixer("sliding_window", d_model=32, n_heads=2, window=1, sinks=1).eval()
    with torch.no_grad():
        y_full, _ = mixer(x[:, :6])
        _, state = mixer(x[:, :4])
        y_t, state = mixer(x[:, 4:6], state=state)
    assert_close("decode w=1", y_t, y_full[:, 4:], torch.float32)
    assert state.k.shape[1] == 1


def test_mixer_sinks_matter_and_config_errors():
    torch.manual_seed(0)
    with_sinks = gatelab.make_mixer("sliding_window", d_model=32, n_heads=2, window=3, sinks=2).eval()
    without = gatelab.make_mixer("sliding_window", d_model=32, n_heads=2, window=3, sinks=0).eval()
    without.load_state_dict(with_sinks.state_dict())
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        a, _, internals = with_sinks(x, return_internals=True)
        b, _ = without(x)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # the first tokens see the same keys either way
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4
    attn = internals["attn"]  # (B, H, T, T)
    assert (attn[..., 8, :2] > 0).all() and (attn[..., 8, 2:6] == 0).all() and (attn[..., 8, 6:9] > 0).all()
    with pytest.raises(ValueError, match="window"):
        gatelab.make_mixer("sliding_window", d_model=32, n_heads=2, window=0)
    with pytest.raises(ValueError, match="causal"):
        gatelab.make_mixer("sliding_window", d_model=32, n_heads=2, causal=False)


def test_in_the_lab_lm():
    from gatelab.lab.models.lm import LM, LMConfig

    config = LMConfig(
        d_model=32, n_layers=2, n_heads=2, pattern="sliding_window,softmax",
        mixer_options={"sliding_window": {"window": 4, "sinks": 1}}, max_seq_len=64, seed=0,
    )  # fmt: skip
    model = LM(config).eval()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        logits, _ = model(idx)
        prefix, states = model(idx[:, :7])
        steps = [prefix]
        for t in range(7, 20):
            step, states = model(idx[:, t : t + 1], states)
            steps.append(step)
    assert_close("lm decode", torch.cat(steps, 1), logits, torch.float32)
    assert states[0].k.shape[1] == 1 + 4 - 1  # the sliding-window layer holds sinks + window - 1 keys
