"""The compare report from hand-made results: aggregation over seeds, table cells, strict JSON, plots."""

import json
import math

import pytest

from gatelab.lab.report import aggregate, format_cell, mean_std, table_rows, to_json_safe, write_report


def fake_run(mixer, task, seed, loss, sink, status="ok"):
    if status != "ok":
        return {"mixer": mixer, "task": task, "seed": seed, "status": status, "error": "RuntimeError: boom"}
    history = [
        {"step": s, "split": "train", "loss": loss + 1 / s, "lr": 1e-3, "tokens_per_s": 1000.0}
        for s in range(1, 11)
    ]
    history += [
        {"step": 5, "split": "val", "loss": loss + 0.2, "accuracy": 0.5},
        {"step": 10, "split": "val", "loss": loss, "accuracy": 0.9},
    ]
    return {
        "mixer": mixer,
        "task": task,
        "seed": seed,
        "status": status,
        "final": {"loss": loss, "accuracy": 0.9},
        "history": history,
        "tokens_per_s": 1000.0 + seed,
        "params": 1234,
        "wall_s": 2.0,
        "diagnostics": {
            "sink_share_layer": [sink, None if mixer == "gla" else sink / 2],
            "sink_share_uniform": 0.25,
            "max_activation": [1.0, 2.0, 3.0],
            "summary": {
                "sink_share": sink,
                "max_activation": 3.0,
                "w8a8_gap": float("nan"),
                "gate_mean": None,
            },
        },
    }


@pytest.fixture
def results():
    runs = [
        fake_run("softmax", "mqar", 0, 1.0, 0.5),
        fake_run("softmax", "mqar", 1, 1.2, 0.7),
        fake_run("gla", "mqar", 0, 2.0, 0.1),
        fake_run("gla", "mqar", 1, 2.0, 0.1, status="error"),
        fake_run("softmax", "text", 0, 3.0, 0.3),
        fake_run("gla", "text", 0, 3.5, 0.2, status="error"),
    ]
    config = {
        "preset": "test",
        "description": "hand-made",
        "mixers": ["softmax", "gla"],
        "tasks": ["mqar", "text"],
    }
    budget = dict(n_layers=2, d_model=8, n_heads=2, steps=10, batch_size=4, lr=1e-3)
    config.update(seeds=[0, 1], task_config={"mqar": budget, "text": {**budget, "n_layers": 4}}, **budget)
    env = {"machine": "test", "device": "cpu", "torch": "x", "threads": 1}
    return {"name": "t", "config": config, "environment": env, "tasks": {}, "runs": runs, "wall_s": 1.0}


def test_mean_std_and_cells():
    stats = mean_std([1.0, None, 3.0])
    assert stats == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert format_cell({"mean": 1.0, "std": 0.1, "n": 3}, ".3f") == "1.000 ± 0.100"
    assert format_cell({"mean": 1.0, "std": 0.0, "n": 1}, ".3f") == "1.000"
    assert format_cell({"mean": 0.5, "std": 0.25, "n": 2}, "+.2f") == "+0.50 ± 0.25"
    assert format_cell({"mean": None, "std": None, "n": 0}, ".3f") == "-"


def test_aggregate_over_seeds_skips_failed_runs(results):
    agg = aggregate(results["runs"])
    assert agg["mqar"]["softmax"]["loss"]["mean"] == pytest.approx(1.1)
    assert agg["mqar"]["softmax"]["loss"]["std"] == pytest.approx(math.sqrt(0.02))
    assert agg["mqar"]["softmax"]["sink_share"]["n"] == 2
    assert agg["mqar"]["gla"]["loss"]["n"] == 1  # the failed seed is not averaged in
    assert "gla" not in agg["text"]
    assert agg["mqar"]["softmax"]["w8a8_gap"]["n"] == 0  # NaN counts as missing


def test_table_rows_show_spread_missing_and_failures(results):
    results["aggregate"] = aggregate(results["runs"])
    header, rows = table_rows(results, "mqar")
    assert header[0] == "mixer" and len(rows) == 2
    assert rows[0][0] == "softmax" and rows[0][1] == "1.100 ± 0.141"
    gap_col = header.index("W8A8 gap")
    assert rows[0][gap_col] == "-" and rows[0][header.index("gate mean")] == "-"
    _, text_rows = table_rows(results, "text")
    assert text_rows[1][0] == "gla" and text_rows[1][1].startswith("failed: RuntimeError: boom")


def test_write_report_writes_strict_json_plots_and_markdown(results, tmp_path):
    paths = write_report(tmp_path, results)
    data = json.loads(
        paths["results"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")
    )
    assert data["aggregate"]["mqar"]["softmax"]["loss"]["mean"] == pytest.approx(1.1)
    assert data["runs"][0]["diagnostics"]["summary"]["w8a8_gap"] is None
    for name in ("loss_curves", "mqar_accuracy", "sink_share", "max_activation", "speed"):
        png = paths[name].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    report = paths["report"].read_text()
    for name in ("loss_curves", "mqar_accuracy", "sink_share", "max_activation", "speed"):
        assert f"]({name}.png)" in report
    assert "2 layers, d_model 8, 2 heads; 10 steps of batch 4" in report and "4 layers, d_model 8" in report
    table_lines = [ln for ln in report.splitlines() if ln.startswith("| softmax |")]
    assert len(table_lines) == 2 and "1.100 ± 0.141" in table_lines[0]
    n_columns = report.splitlines()[
        [i for i, ln in enumerate(report.splitlines()) if ln.startswith("| mixer")][0]
    ].count("|")
    assert all(ln.count("|") == n_columns for ln in table_lines)  # no stray pipe breaks the table


def test_no_mqar_no_mqar_plot(results, tmp_path):
    results["runs"] = [r for r in results["runs"] if r["task"] == "text"]
    results["config"]["tasks"] = ["text"]
    paths = write_report(tmp_path, results)
    assert "mqar_accuracy" not in paths and not (tmp_path / "mqar_accuracy.png").exists()


def test_to_json_safe():
    assert to_json_safe({"a": (1.0, float("inf")), 2: [float("nan")]}) == {"a": [1.0, None], "2": [None]}


def test_merge_results_of_per_seed_processes_equals_one_report(results, tmp_path):
    from gatelab.lab.report import merge_results

    by_seed = {}
    for seed in (0, 1):
        part = dict(results, runs=[r for r in results["runs"] if r["seed"] == seed], wall_s=1.0 + seed)
        part["config"] = dict(results["config"], seeds=[seed])
        by_seed[seed] = tmp_path / f"s{seed}"
        write_report(by_seed[seed], part)
    merged = merge_results([by_seed[0], by_seed[1]], tmp_path / "merged")
    assert merged["config"]["seeds"] == [0, 1] and merged["wall_s"] == 2.0
    assert merged["aggregate"] == aggregate(results["runs"])
    assert "softmax" in (tmp_path / "merged" / "report.md").read_text()
    other = dict(results, config=dict(results["config"], preset="other"))
    write_report(tmp_path / "other", other)
    with pytest.raises(ValueError, match="one preset"):
        merge_results([by_seed[0], tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no results.json"):
        merge_results([tmp_path / "missing"], tmp_path / "bad")
