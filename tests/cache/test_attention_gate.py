"""The attention gate: relaxed training path vs hard inference path, eviction, the eviction-rate loss,
and the evaluation helpers and command on tiny sizes."""

import json

import pytest
import torch

import gatelab
from gatelab.cache import MASKED, apply_policy, eviction_loss, kept_fraction, make_policy
from gatelab.lab.kv.evaluate import decode_eval, finetune_gates
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.testing import assert_close


def saturated_gate(policy, scale=30.0):
    """Replace the gate by one whose logits are +-scale: keep/evict decided by the sign of x's channels."""
    inner = policy.gate

    def forward(x, state):
        _, new_state = inner.__class__.forward(inner, x, state)
        heads = inner.out.out_features
        return scale * torch.sign(x[..., :heads] + 0.3), new_state

    policy.gate.forward = forward
    return policy


def run_decode(mixer, x, prefix):
    y, state = mixer(x[:, :prefix])
    outs = [y]
    for t in range(prefix, x.shape[1]):
        y, state = mixer(x[:, t : t + 1], state=state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize(
    "key, relaxation, compact",
    [
        ("softmax", "soft", False),
        ("gated_softmax", "soft", False),
        ("clipped_softmax", "straight_through", False),
        ("softmax", "straight_through", True),
        ("gated_softmax", "straight_through", True),
    ],
)
def test_relaxed_training_path_matches_hard_flags_when_saturated(key, relaxation, compact):
    torch.manual_seed(0)
    options = {"n_kv_heads": 2} if key == "softmax" else {}
    mixer = gatelab.make_mixer(key, d_model=64, n_heads=4, **options)
    policy = make_policy("attention_gate", mixer, relaxation=relaxation, rope_by_cache_position=compact)
    mixer.cache_policy = saturated_gate(policy)
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        mixer.train()
        relaxed, _ = mixer(x)  # log-gates (soft: log sigmoid(+-30)) added to the scores, nothing evicted
        mixer.eval()
        hard, hard_state = mixer(x)  # hard flags, evicted tokens dropped after the pass
        decoded, state = run_decode(mixer, x, 4)  # hard flags, evicted tokens never stored
        one_by_one, _ = run_decode(mixer, x, 1)
        policy.rope_by_cache_position = not compact
        other, _ = mixer(x)  # the other RoPE positions give other outputs
    assert_close(f"{key} relaxed vs hard", relaxed, hard, torch.float32)
    assert_close(f"{key} decode vs parallel", decoded, hard, torch.float32)
    assert_close(f"{key} token by token vs parallel", one_by_one, hard, torch.float32)
    assert (other - hard).abs().max() > 1e-3
    kept = (x[..., : state.k.shape[2]] + 0.3 > 0).transpose(0, 0)  # (B, T, Hkv) flags
    kept[:, 0] = True  # the first token is always kept
    assert state.kept_tokens == int(kept.sum()) == hard_state.kept_tokens
    assert state.k.shape[1] == int(kept.sum(dim=1).max()) < 17  # the cache shrank
    for b in range(3):  # exactly the kept tokens are stored, in position order, padding masked and zeroed
        for h in range(state.k.shape[2]):
            valid = state.bias[b, :, h] > MASKED / 2
            assert torch.equal(state.positions[b, valid, h], kept[b, :, h].nonzero().flatten())
            assert (state.k[b, ~valid, h] == 0).all() and (state.v[b, ~valid, h] == 0).all()


def test_evicted_token_is_hidden_from_later_queries():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer("softmax", d_model=64, n_heads=4).eval()
    mixer.cache_policy = saturated_gate(make_policy("attention_gate", mixer))
    x = torch.randn(1, 12, 64)
    x[0, 5, :4] = -5.0  # token 5 is evicted by every head
    x[0, 6:, :4] = 5.0  # later tokens are kept
    x.requires_grad_(True)
    y, _, internals = mixer(x, return_internals=True)
    assert (internals["attn"][..., 5] == 0).all()  # no query, not even its own, sees it
    y[0, 6:].sum().backward()
    assert x.grad[0, 5].abs().max() < 1e-6 * x.grad[0, 6:].abs().max()  # only the gate's own path


def test_gate_gradients_and_eviction_loss():
    model = LM(LMConfig(d_model=32, n_layers=2, n_heads=2, seed=0)).train()
    policies = apply_policy(model, "attention_gate", target_keep=0.25)
    idx = torch.randint(0, 256, (2, 16))
    logits, _ = model(idx)
    loss = logits.logsumexp(-1).mean() + eviction_loss(model)
    loss.backward()
    for policy in policies:
        for name, p in policy.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert kept_fraction(model) == pytest.approx(1.0)  # init_keep = 0.9: every flag starts at "keep"
    assert float(eviction_loss(model).detach()) == pytest.approx(2 * 0.75**2, rel=1e-4)
    with pytest.raises(ValueError, match="target_keep"):
        apply_policy(model, "attention_gate", target_keep=0.0)


def test_finetune_and_decode_eval_on_tiny_sizes():
    from gatelab.lab.tasks import make_task

    task = make_task("text", seq_len=16, max_bytes=50_000)
    model = LM(
        LMConfig(vocab_size=task.vocab_size, d_model=32, n_layers=1, n_heads=2, seed=0, max_seq_len=32)
    )
    tuned, history = finetune_gates(model, task, target_keep=0.25, steps=12, batch_size=4, gate_lr=0.2)
    assert history[-1]["kept"] < history[0]["kept"]  # the eviction-rate loss pulls the kept share down
    batches = make_task("text", seq_len=32, max_bytes=50_000).eval_batches(1, 2)
    full = decode_eval(model, batches, "full")
    gated = decode_eval(tuned, batches, "attention_gate")
    h2o = decode_eval(model, batches, "h2o", budget=0.25, seq_len=32)
    assert full["kept_fraction"] == 1.0 and h2o["kept_fraction"] == 0.25
    assert full["kept_bytes_fraction"] == 1.0 and h2o["kept_bytes_fraction"] == 0.25
    full_bytes = sum(full["bytes_per_layer"])
    needed = sum(gated["kept_bytes_per_layer"]) + sum(gated["gate_bytes_per_layer"])
    assert gated["kept_bytes_fraction"] == pytest.approx(needed / full_bytes)
    assert gated["kept_bytes_fraction"] <= gated["held_fraction"]
    assert gated["kept_fraction"] < 1.0 and sum(gated["kept_bytes_per_layer"]) < sum(full["bytes_per_layer"])
    assert h2o["peak_cache_bytes"] == 2 * 8 * 2 * 16 * 4 * 2  # budget 8 tokens, 2 rows, 2 heads, k and v
    assert "cache_policy" not in model.blocks[0].mixer._modules  # the policy is removed afterwards


def test_cache_command_quick(tmp_path):
    from gatelab.cli import main

    out = tmp_path / "run"
    argv = [
        "cache",
        "--quick",
        "--tasks",
        "text",
        "--budgets",
        "1.0,0.5",
        "--gate-recent",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["tasks"]["text"]["rows"]
    assert {r["policy"] for r in rows} == {
        "full",
        "streaming",
        "h2o",
        "attention_gate",
        "attention_gate+recent4",
    }
    recent = next(r for r in rows if r["policy"] == "attention_gate+recent4" and r["budget"] == 0.5)
    assert recent["gate_options"]["target_keep"] == pytest.approx(0.5 - 1.5 * 4 / 24)  # the blocks' share
    half = {r["policy"]: r for r in rows if r["budget"] == 0.5}
    assert half["streaming"]["kept_fraction"] == half["h2o"]["kept_fraction"] == 0.5
    assert (out / "quality_vs_memory.png").stat().st_size > 0 and "| h2o | 0.50 |" in (
        out / "report.md"
    ).read_text()
    assert main(["cache", "--budgets", "0", "--out", str(out)]) == 2
    assert main(["cache", "--policies", "lru", "--out", str(out)]) == 2
    assert main(["cache", "--gate-recent", "-1", "--out", str(out)]) == 2


def test_bf16_hard_decode_against_fp32():
    torch.manual_seed(0)
    mixer = gatelab.make_mixer("gated_softmax", d_model=64, n_heads=4).eval()
    mixer.cache_policy = saturated_gate(make_policy("attention_gate", mixer))
    x = torch.randn(3, 15, 64)
    with torch.no_grad():
        expected, _ = mixer(x)  # fp32, evicted keys masked through the extra bias channel
        mixer.to(torch.bfloat16)
        decoded, state = run_decode(mixer, x.to(torch.bfloat16), 3)
    assert state.k.shape[1] < 15
    assert_close("bf16 decode with evictions", decoded.float(), expected, torch.bfloat16)


@pytest.mark.parametrize("window", [None, 5])
def test_gate_reads_the_context_causally_and_decodes_like_parallel(window):
    from gatelab.cache import AttentionGate

    torch.manual_seed(0)
    gate = AttentionGate(32, kv_heads=2, heads=2, d_gate=4, window=window)
    torch.nn.init.normal_(gate.out.weight)  # let the attention path weigh in the logits
    x = torch.randn(3, 63, 32)
    with torch.no_grad():
        logits, state = gate(x, None)
        moved = x.clone()
        moved[:, 50] += 1.0
        changed = (gate(moved, None)[0] - logits).abs().amax(dim=(0, 2))  # (T,)
        steps, step_state = [], None
        for t in range(63):
            out, step_state = gate(x[:, t : t + 1], step_state)
            steps.append(out)
    assert (changed[:50] == 0).all() and changed[50] > 0  # causal: no flag depends on a later token
    seen = changed[51:] > 0  # later flags read token 50 through the gate's attention
    assert seen.all() if window is None else seen[: window - 1].all() and not seen[window - 1 :].any()
    assert_close("gate decode vs parallel", torch.cat(steps, dim=1), logits, torch.float32)
    held = 63 if window is None else window - 1
    assert state.k.shape == step_state.k.shape == (3, held, 2, 4)


def test_gate_state_bytes_are_counted():
    from gatelab.cache import cache_bytes

    torch.manual_seed(0)
    mixer = gatelab.make_mixer("softmax", d_model=64, n_heads=4).eval()
    mixer.cache_policy = make_policy("attention_gate", mixer, heads=2, d_gate=4, window=8)
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 20, 64))
    (layer,) = cache_bytes([state])
    assert layer["gate"] == 2 * (2 * 7 * 2 * 4) * 4  # k and v, 2 rows, window - 1 tokens, 2 heads x 4, fp32
    assert layer["held"] == state.nbytes


def test_gate_option_errors():
    mixer = gatelab.make_mixer("softmax", d_model=64, n_heads=4)
    for bad in ({"heads": 0}, {"d_gate": 2.5}, {"window": 0}, {"window": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_policy("attention_gate", mixer, **bad)


@pytest.mark.parametrize("key", ["softmax", "gated_softmax"])
def test_recent_blocks_keep_evicted_tokens_visible_for_one_more_block(key):
    torch.manual_seed(0)
    c = 4
    mixer = gatelab.make_mixer(key, d_model=64, n_heads=4)
    policy = saturated_gate(make_policy("attention_gate", mixer, recent=c))
    mixer.cache_policy = policy
    x = torch.randn(3, 19, 64)
    flags = x[..., : mixer.config.kv_heads] + 0.3 > 0  # (B, T, Hkv)
    flags[:, 0] = True
    with torch.no_grad():
        mixer.train()
        relaxed, _ = mixer(x)
        mixer.eval()
        hard, _ = mixer(x)  # cut into blocks of 4 inside the policy
        decoded, state = run_decode(mixer, x, 6)
        outs, step = [], None
        for t in range(19):  # one token at a time: every call lies in one block, internals allowed
            new = torch.full((3, 1, mixer.config.kv_heads), t)
            pos = new if step is None else torch.cat([step.positions, new], dim=1)  # rows it attends
            y, step, internals = mixer(x[:, t : t + 1], state=step, return_internals=True)
            outs.append(y)
            attn = internals["attn"][:, :, 0]  # (B, H, S) over the cache rows
            group = mixer.config.n_heads // mixer.config.kv_heads
            for h in range(mixer.config.n_heads):
                rows = pos[:, :, h // group]  # (B, S)
                seen = attn[:, h] > 0
                j = rows.clamp(min=0)
                allowed = (rows >= 0) & (flags[:, :, h // group].gather(1, j) | (t // c - j // c <= 1))
                assert not (seen & ~allowed).any()  # no hidden or padding row is attended
                assert (seen | ~allowed).all()  # every visible token is attended
    assert_close("relaxed vs hard", relaxed, hard, torch.float32)
    assert_close("decode vs parallel", decoded, hard, torch.float32)
    assert_close("token by token vs parallel", torch.cat(outs, dim=1), hard, torch.float32)
    older = torch.arange(19).view(1, -1, 1) // c < 19 // c - 1  # tokens whose block has passed
    assert state.kept_tokens == int((flags | ~older).sum())  # evicted old tokens are gone, recent ones held
    with pytest.raises(ValueError, match="internals"):
        mixer(x, return_internals=True)


def test_cache_command_seeds_give_mean_and_std(tmp_path):
    from gatelab.cli import main
    from gatelab.commands.cache import aggregate_rows

    rows = aggregate_rows([[{"policy": "h2o", "budget": 0.5, "loss": 1.0, "accuracy": 0.5, "note": "a"}],
                           [{"policy": "h2o", "budget": 0.5, "loss": 3.0, "accuracy": 0.7, "note": "b"}]])  # fmt: skip
    assert rows == [{"policy": "h2o", "budget": 0.5, "loss": 2.0, "accuracy": pytest.approx(0.6),
                     "note": "a", "loss_std": pytest.approx(2**0.5), "accuracy_std": pytest.approx(0.02**0.5),
                     "seeds": 2}]  # fmt: skip
    out = tmp_path / "run"
    argv = [
        "cache",
        "--quick",
        "--tasks",
        "mqar",
        "--budgets",
        "0.5",
        "--policies",
        "full,h2o",
        "--seeds",
        "2",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    entry = json.loads((out / "results.json").read_text())["tasks"]["mqar"]
    assert entry["seeds"] == [0, 1] and len(entry["runs"]) == 2
    losses = [next(r["loss"] for r in run["rows"] if r["policy"] == "h2o") for run in entry["runs"]]
    h2o = next(r for r in entry["rows"] if r["policy"] == "h2o")
    assert h2o["loss"] == pytest.approx(sum(losses) / 2) and h2o["seeds"] == 2
    assert " ± " in (out / "report.md").read_text()


def test_finetune_gates_depends_on_its_seed_only():
    from gatelab.lab.tasks import make_task

    task = make_task("text", seq_len=16, max_bytes=50_000)
    model = LM(
        LMConfig(vocab_size=task.vocab_size, d_model=32, n_layers=1, n_heads=2, seed=0, max_seq_len=16)
    )
    torch.manual_seed(1)
    _, first = finetune_gates(model, task, target_keep=0.5, steps=3, batch_size=2, seed=7)
    torch.rand(100)  # whatever ran before must not change the gates' init
    _, second = finetune_gates(model, task, target_keep=0.5, steps=3, batch_size=2, seed=7)
    assert first == second


def test_gates_trained_from_scratch_with_the_lm(tmp_path):
    from gatelab.cli import main
    from gatelab.lab.tasks import make_task
    from gatelab.lab.train import TrainConfig, train

    task = make_task("text", seq_len=16, max_bytes=50_000)
    config = LMConfig(vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=2, seed=0, max_seq_len=16,
                      pattern="softmax,gla",
                      attention_gate={"target_keep": 0.25, "init_keep": 0.6})  # fmt: skip
    model = LM(config)
    assert _gate_count(model) == 1  # the softmax layer; gla keeps a recurrent state, no KV cache
    train(model, task, TrainConfig(steps=15, batch_size=4, lr=3e-2, warmup=1, eval_every=0, progress=False,
                                   out_dir=str(tmp_path / "run")))  # fmt: skip
    assert kept_fraction(model) < 0.6  # the eviction-rate loss reached the gates through the trainer
    loaded = LM.load(tmp_path / "run")  # the config rebuilds the gates, the weights fill them
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model.eval()(idx)[0])
    with pytest.raises(ValueError, match="softmax-family"):
        LM(LMConfig(d_model=32, n_layers=1, n_heads=2, pattern="gla", attention_gate={}))
    argv = ["train", "--task", "text", "--seq-len", "16", "--steps", "2", "--batch-size", "2", "--d-model", "32",
            "--attention-gate", "target_keep=0.5", "--attention-gate", "recent=4", "--no-progress",
            "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["attention_gate"] == {
        "target_keep": 0.5, "recent": 4}  # fmt: skip


def _gate_count(model) -> int:
    return sum("cache_policy" in block.mixer._modules for block in model.blocks)
