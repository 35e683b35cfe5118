"""`gatelab compare --kv-cache`: every trained softmax-family run decodes under each KV-cache policy and
budget (full = the parallel forward's loss), recurrent mixers are marked as without a KV cache, the report
and `gatelab merge` carry the rows, and bad options are refused before any training."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from gatelab.cli import main
from gatelab.lab.kv.rows import KVCacheOptions, evaluate_run, parse_options
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.presets import PRESETS
from gatelab.lab.report import merge_results
from gatelab.lab.tasks import IGNORE, make_task

KV_ARGS = ["--kv-cache", "streaming,h2o,attention_gate", "--kv-budgets", "0.5", "--kv-gate-steps", "2"]


def _compare(out, *args):
    threads = torch.get_num_threads()
    try:
        return main(
            ["compare", "--preset", "quick", "--steps", "3", "--threads", "1", "--out", str(out), *args]
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = _compare(out, "--mixers", "softmax,gla", "--tasks", "text", "--name", "kv", *KV_ARGS)
    run_dir = out / "kv"
    return rc, run_dir, json.loads((run_dir / "results.json").read_text())


def test_softmax_decodes_under_every_policy_and_gla_has_no_cache(kv_run):
    rc, run_dir, results = kv_run
    assert rc == 0
    assert results["config"]["kv_cache"] == {
        "policies": ["full", "streaming", "h2o", "attention_gate"],
        "budgets": [0.5],
        "gate_steps": 2,
        "context": 1,
    }
    softmax = next(r for r in results["runs"] if r["mixer"] == "softmax")
    rows = {(row["policy"], row["budget"]): row for row in softmax["kv_cache"]}
    assert list(rows) == [("full", 1.0), ("streaming", 0.5), ("h2o", 0.5), ("attention_gate", 0.5)]
    assert not any("error" in row for row in rows.values())
    full = rows[("full", 1.0)]
    assert full["kept_fraction"] == 1.0 and full["held_fraction"] == 1.0
    for policy in ("streaming", "h2o"):  # 16 of the 32 tokens: half the bytes of the full cache
        assert rows[(policy, 0.5)]["kept_fraction"] == 0.5
        assert rows[(policy, 0.5)]["peak_cache_bytes"] * 2 == full["peak_cache_bytes"]
    assert rows[("attention_gate", 0.5)]["gate_steps"] == 2
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0 and row["tokens_per_s"] > 0
    T = PRESETS["quick"].task_options["text"]["seq_len"]
    assert softmax["kv_cache_batch"] == {"batch_size": PRESETS["quick"].diag_batch_size, "seq_len": T}

    # the full cache decodes the first diagnostic batch: its loss is the parallel forward's
    model = LM.load(run_dir / softmax["model_dir"]).eval()
    task = make_task("text", **PRESETS["quick"].task_options["text"])
    inputs, targets = task.eval_batches(PRESETS["quick"].diag_batches, PRESETS["quick"].diag_batch_size)[0]
    with torch.no_grad():
        logits = model(inputs)[0]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).item()
    assert full["loss"] == pytest.approx(loss, rel=1e-4)

    gla = next(r for r in results["runs"] if r["mixer"] == "gla")
    assert gla["status"] == "ok" and gla["kv_cache"] == []
    assert gla["kv_cache_note"].startswith("no KV cache") and "GatedLinearAttention" in gla["kv_cache_note"]
    assert " ".join(KV_ARGS) in results["command"]


def test_report_has_the_kv_cache_section(kv_run):
    _, run_dir, results = kv_run
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## KV-cache policies") :]
    assert "### text: 8 sequences of T=32 decoded token by token" in section
    for policy in ("full | 1", "streaming | 0.5", "h2o | 0.5", "attention_gate | 0.5"):
        assert f"| softmax | {policy} | " in section
    assert "| gla | no KV cache |" in section
    # the gated copy's own weights fine-tune too: its row is paired with the control's full cache
    gate = next(row for row in results["runs"][0]["kv_cache"] if row["policy"] == "attention_gate")
    line = next(line for line in section.splitlines() if line.startswith("| softmax | attention_gate |"))
    assert line.split(" | ")[4] == format(gate["loss"] - gate["reference_loss"], "+.3f")


def test_printed_kv_tables_keep_a_variants_options(kv_run):
    """rich would read "[qk_norm=true]" as markup and drop it: the KV-cache tables escape their cells."""
    from rich.console import Console

    from gatelab.lab.kv.rows import print_tables

    results = copy.deepcopy(kv_run[2])
    label = "softmax[qk_norm=true]"
    results["config"]["mixers"] = [label if m == "softmax" else m for m in results["config"]["mixers"]]
    for run in results["runs"]:
        run["mixer"] = label if run["mixer"] == "softmax" else run["mixer"]
    console = Console(width=400, record=True)
    print_tables(results, console)
    assert label in console.export_text()


def test_merge_carries_the_rows_and_averages_over_seeds(kv_run, tmp_path):
    _, run_dir, results = kv_run
    first = {row["policy"]: row["loss"] for row in results["runs"][0]["kv_cache"]}
    results = copy.deepcopy(results)
    other = tmp_path / "seed1"
    shutil.copytree(run_dir, other)
    for run in results["runs"]:  # a second seed whose h2o loss is 1.0 higher
        run["seed"] = 1
        for row in run["kv_cache"]:
            row["loss"] += 1.0 if row["policy"] == "h2o" else 0.0
    results["config"]["seeds"] = [1]
    (other / "results.json").write_text(json.dumps(results))
    merged = merge_results([run_dir, other], tmp_path / "merged")
    assert sum(len(r["kv_cache"]) for r in merged["runs"]) == 8
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "## KV-cache policies" in report
    h2o = next(line for line in report.splitlines() if line.startswith("| softmax | h2o |"))
    paired = first["h2o"] - first["full"] + 0.5  # loss - full, mean over the two seeds
    assert f"| {paired:+.3f} ± 0.707 |" in h2o


def test_without_kv_cache_nothing_changes(tmp_path):
    assert (
        _compare(tmp_path, "--mixers", "softmax", "--tasks", "mqar", "--steps", "1", "--name", "plain") == 0
    )
    results = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert results["config"]["kv_cache"] is None
    assert not any(key.startswith("kv_cache") for key in results["runs"][0])
    assert "KV-cache" not in (tmp_path / "plain" / "report.md").read_text()
    assert "--kv" not in results["command"]


def test_a_failing_policy_leaves_the_other_rows(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("gate exploded")

    monkeypatch.setattr("gatelab.lab.kv.evaluate.finetune_gates", broken)
    task = make_task("mqar", vocab_size=32, seq_len=16, num_kv_pairs=4)
    config = LMConfig(
        vocab_size=32, d_model=16, n_layers=1, n_heads=2, pattern="softmax", max_seq_len=16, seed=0
    )
    options = KVCacheOptions(("full", "streaming", "attention_gate"), (1.0,), 1)
    out = evaluate_run(LM(config), task, task.eval_batches(1, 2), options, batch_size=2, seed=0)
    full, streaming, gate = out["kv_cache"]
    assert gate == {"policy": "attention_gate", "budget": 1.0, "error": "RuntimeError: gate exploded"}
    # a budget of the whole sequence keeps every token: streaming is the full cache
    assert streaming["loss"] == pytest.approx(full["loss"]) and streaming["kept_fraction"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--kv-cache", "streaming,lru"],
            "--kv-cache: unknown policy 'lru'; known policies: full, streaming",
        ),
        (["--kv-cache", "h2o,h2o"], "--kv-cache lists a policy twice"),
        (["--kv-cache", "h2o", "--kv-budgets", "0"], "--kv-budgets must be fractions in (0, 1]"),
        (["--kv-cache", "h2o", "--kv-budgets", "0.5,1.5"], "--kv-budgets must be fractions in (0, 1]"),
        (["--kv-cache", "h2o", "--kv-budgets", "half"], "--kv-budgets expects comma-separated fractions"),
        (["--kv-cache", "attention_gate", "--kv-gate-steps", "0"], "--kv-gate-steps must be a positive int"),
        (["--kv-cache", "h2o", "--kv-gate-steps", "5"], "--kv-gate-steps applies to the attention_gate"),
        (["--kv-budgets", "0.5"], "--kv-budgets applies only with --kv-cache"),
    ],
)
def test_bad_kv_options_are_refused_before_training(args, message, tmp_path, capsys):
    assert _compare(tmp_path, "--tasks", "mqar", "--mixers", "softmax", *args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*/models/*"))


def test_parse_options_defaults():
    assert parse_options(None, None, None) is None
    options = parse_options("attention_gate, streaming", None, None)
    assert options == KVCacheOptions(("full", "attention_gate", "streaming"), (0.5, 0.25), 100)
    with pytest.raises(ValueError, match="known policies: full, streaming, h2o, attention_gate"):
        parse_options("window", None, None)


def test_gate_reference_is_the_control_fine_tune():
    """The gate row's reference is the run's model fine-tuned without gates as the gated copy was."""
    from gatelab.lab.kv.evaluate import decode_eval, finetune_lm

    task = make_task("text", seq_len=16, max_bytes=50_000)
    model = LM(
        LMConfig(vocab_size=task.vocab_size, d_model=32, n_layers=1, n_heads=2, seed=0, max_seq_len=16)
    )
    batches = task.eval_batches(1, 2)
    options = KVCacheOptions(("full", "attention_gate"), (0.5,), 3)
    fields = evaluate_run(model, task, batches, options, batch_size=4, seed=0)
    gate = next(row for row in fields["kv_cache"] if row["policy"] == "attention_gate")
    control, _ = finetune_lm(model, task, steps=3, batch_size=4, seed=0)
    assert gate["reference_loss"] == pytest.approx(decode_eval(control, batches, "full")["loss"], rel=1e-6)


def test_kv_context_decodes_longer_sequences_and_refuses_tasks_that_cannot_grow(tmp_path):
    task = make_task("text", seq_len=16, max_bytes=50_000)
    model = LM(
        LMConfig(vocab_size=task.vocab_size, d_model=32, n_layers=1, n_heads=2, seed=0, max_seq_len=16)
    )
    options = KVCacheOptions(("full", "h2o"), (0.5,), 1, context=3)
    fields = evaluate_run(model, task, task.eval_batches(1, 2), options, batch_size=2, seed=0)
    assert fields["kv_cache_batch"] == {"batch_size": 2, "seq_len": 48}
    h2o = next(row for row in fields["kv_cache"] if row["policy"] == "h2o")
    assert h2o["kept_fraction"] == 0.5  # half of the 48 decoded tokens
    with pytest.raises(ValueError, match="--kv-context"):
        parse_options("h2o", None, None, 0)
    # MQAR at V=32 cannot hold twice its length: refused before any training, with the option named
    out = tmp_path / "runs"
    argv = ["--mixers", "softmax", "--tasks", "mqar", "--kv-cache", "h2o", "--kv-context", "2"]
    assert _compare(out, *argv) == 2
    assert not (out / "quick").exists() or not list((out / "quick").glob("models/*"))
