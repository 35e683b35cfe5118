"""The Zoology protocol of `gatelab compare`: a learning-rate sweep reported at each mixer's best learning
rate (with the spread), early stopping at an accuracy, grid presets (one table per point, the summary and
the accuracy-vs-d plot), shards merged into one report."""

import functools
import json

import pytest
from helpers import MQAR_TINY, tiny_lm, train_config

from gatelab.cli import main
from gatelab.lab.comparison import apply_overrides, compare, parse_shard
from gatelab.lab.presets import PRESETS, Preset
from gatelab.lab.report import aggregate, merge_results, sweep_table, table_rows
from gatelab.lab.tasks import make_task
from gatelab.lab.train import train
from gatelab.lab.train.config import run_spec

TASK = MQAR_TINY
tiny = tiny_lm
config = functools.partial(train_config, steps=12)


class Scripted:
    """The mqar task whose evaluations report the given accuracies in turn."""

    def __init__(self, accuracies):
        self.task, self.accuracies = make_task("mqar", **TASK), list(accuracies)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, model, **kwargs):
        return {"loss": 1.0, "accuracy": self.accuracies.pop(0) if self.accuracies else 0.0}


def test_early_stop_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path):
    result = train(tiny(), Scripted([0.5, 0.995]), config(tmp_path / "run", early_stop=0.99))
    assert result.stopped_early and result.steps == 6
    vals = [r for r in result.history if r["split"] == "val"]
    assert [r["step"] for r in vals] == [3, 6] and result.final == {"loss": 1.0, "accuracy": 0.995}
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 6
    assert (tmp_path / "run" / "model.safetensors").is_file()  # an early stop is a finished run
    # resuming a run that stopped early trains nothing more
    again = train(tiny(), Scripted([]), config(tmp_path / "run", early_stop=0.99, resume=True))
    assert again.stopped_early and again.steps == 6 and again.final == result.final
    never = train(tiny(), Scripted([0.5, 0.9, 0.98]), config(early_stop=0.99))  # every step trains
    assert not never.stopped_early and never.steps == 12


def test_early_stop_is_validated_and_left_out_of_old_run_specs():
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="early_stop must be an accuracy"):
            config(early_stop=bad)
    with pytest.raises(ValueError, match="needs evaluations"):
        config(early_stop=0.9, eval_every=0)
    task = make_task("mqar", **TASK)
    model = tiny()
    groups = [{"params": list(model.parameters()), "peak_lr": 1e-3, "weight_decay": 0.0}]
    assert "early_stop" not in run_spec(model, task, config(), groups, {})["train"]  # checkpoints before it
    assert run_spec(model, task, config(early_stop=0.5), groups, {})["train"]["early_stop"] == 0.5


def test_lrs_early_stop_and_shard_arguments():
    preset = apply_overrides(PRESETS["quick"], lrs="1e-3, 3e-3", early_stop=0.99)
    assert preset.learning_rates == (1e-3, 3e-3) and preset.early_stop == 0.99
    assert PRESETS["quick"].learning_rates == (PRESETS["quick"].lr,)
    for bad, message in (("1e-3,x", "comma-separated"), ("1e-3,1e-3", "twice"), ("-1", "positive")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(PRESETS["quick"], lrs=bad)
    with pytest.raises(ValueError, match="--early-stop must be an accuracy"):
        apply_overrides(PRESETS["quick"], early_stop=2.0)
    assert parse_shard(None) == (0, 1) and parse_shard("2/3") == (1, 3)
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(ValueError, match="--shard must be K/N"):
            parse_shard(bad)


def test_grid_points_are_settings_named_by_their_axes():
    settings = PRESETS["zoology"].settings("mqar")
    assert len(settings) == 16 and settings[0].label == "mqar(T=64,kv=4,d=64)"
    last = settings[-1]
    assert last.task_options == {"vocab_size": 8192, "seq_len": 512, "num_kv_pairs": 64}
    assert last.budget.d_model == 512 and last.budget.batch_size == 128 and last.point["d_model"] == 512
    assert PRESETS["zoology"].learning_rates == (1e-4, 4.6e-4, 2.2e-3, 1e-2)
    assert [s.label for s in PRESETS["quick"].settings("mqar")] == ["mqar"]
    with pytest.raises(ValueError, match="unknown fields"):
        PRESETS["quick"].replace(grid={"mqar": ({"d_modle": 8},)})


def _run(mixer, lr, accuracy, seed=0, task="mqar", **extra):
    return {"mixer": mixer, "task": task, "task_name": "mqar", "seed": seed, "status": "ok", "lr": lr,
            "final": {"loss": 1.0 - accuracy, "accuracy": accuracy}, **extra}  # fmt: skip


def test_aggregate_reports_the_best_learning_rate_and_the_spread():
    runs = [
        _run("a", 1e-3, 0.30), _run("a", 1e-3, 0.40, seed=1),
        _run("a", 1e-2, 0.99, early_stop=0.99, steps=50), _run("a", 1e-2, 0.50, seed=1, early_stop=0.99),
        _run("b", 1e-3, 0.20),
    ]  # fmt: skip
    agg = aggregate(runs)["mqar"]
    assert agg["a"]["best_lr"]["mean"] == 1e-2 and agg["a"]["accuracy"]["mean"] == pytest.approx(0.745)
    assert agg["a"]["lr_range"]["min"] == pytest.approx(0.35) and agg["a"]["lr_range"]["max"] == 0.745
    assert agg["a"]["solved"]["mean"] == 0.5  # one of the two seeds reached the threshold
    assert "best_lr" not in agg["b"]  # one learning rate: nothing was chosen
    results = {
        "config": {"mixers": ["a", "b"], "tasks": ["mqar"]},
        "runs": runs,
        "aggregate": aggregate(runs),
    }
    header, rows = table_rows(results, "mqar")
    assert header[1:5] == ["solved", "steps", "best lr", "over lrs"]
    assert rows[0][:5] == ["a", "0.50 ± 0.71", "50", "0.01", "0.35-0.74"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """A 2 x 2 grid (two sequence lengths, two widths) of two mixers at two learning rates, as two shards
    merged, and the same comparison in one process."""
    out = tmp_path_factory.mktemp("zoo")
    grid = tuple(
        {"task_options": {"seq_len": T, "num_kv_pairs": 2}, "d_model": d} for T in (8, 12) for d in (8, 16)
    )
    preset = PRESETS["quick"].replace(
        name="tinyzoo", tasks=("mqar",), grid={"mqar": grid}, lrs=(1e-3, 1e-2), early_stop=0.99, steps=4,
        eval_every=2, n_heads=1, diag_batches=1,
    )  # fmt: skip
    kwargs = dict(mixers="softmax,gla", tasks=["mqar"], out=out, threads=1, device="cpu")
    whole = compare(preset, name="whole", **kwargs)
    shards = [compare(preset, name=f"part{k}", shard=f"{k}/2", **kwargs) for k in (1, 2)]
    merged = merge_results([out / "part1", out / "part2"], out / "merged")
    return out, whole, shards, merged


def test_a_grid_runs_every_point_mixer_and_learning_rate(grid_run):
    out, whole, shards, merged = grid_run
    assert whole["config"]["tasks"] == ["mqar(T=8,kv=2,d=8)", "mqar(T=8,kv=2,d=16)", "mqar(T=12,kv=2,d=8)",
                                        "mqar(T=12,kv=2,d=16)"]  # fmt: skip
    assert len(whole["runs"]) == 4 * 2 * 2 and all(r["status"] == "ok" for r in whole["runs"])
    assert {r["lr"] for r in whole["runs"]} == {1e-3, 1e-2} and whole["runs"][0]["task_name"] == "mqar"
    assert whole["tasks"]["mqar(T=12,kv=2,d=16)"]["seq_len"] == 12
    params = {r["task"]: r["params"] for r in whole["runs"] if r["mixer"] == "softmax"}
    assert params["mqar(T=8,kv=2,d=16)"] > params["mqar(T=8,kv=2,d=8)"]  # d_model follows the point
    models = sorted(p.name for p in (out / "whole" / "models").iterdir())
    assert len(models) == 16 and "softmax__mqar-T-8-kv-2-d-8__seed0__lr0.001" in models
    header, rows = sweep_table(whole)
    assert header == ["mixer", "T=8,kv=2,d=8", "T=8,kv=2,d=16", "T=12,kv=2,d=8", "T=12,kv=2,d=16"]
    assert [r[0] for r in rows] == ["softmax", "gla"] and "@" in rows[0][1]
    report = (out / "whole" / "report.md").read_text()
    assert "Accuracy at the best learning rate per grid point" in report and "sweep.png" in report
    assert (out / "whole" / "sweep.png").stat().st_size > 0


def test_shards_merge_into_the_whole_comparison(grid_run):
    out, whole, shards, merged = grid_run
    assert [len(s["runs"]) for s in shards] == [8, 8] and shards[0]["config"]["shard"] == [0, 2]
    key = lambda r: (r["mixer"], r["task"], r["lr"], r["seed"])  # noqa: E731
    assert sorted(map(key, merged["runs"])) == sorted(map(key, whole["runs"]))
    for task in whole["config"]["tasks"]:  # the same runs, the same seeds: the same table
        for mixer in ("softmax", "gla"):
            a, b = whole["aggregate"][task][mixer], merged["aggregate"][task][mixer]
            assert a["best_lr"] == b["best_lr"] and a["loss"]["mean"] == pytest.approx(b["loss"]["mean"])
    assert (out / "merged" / "sweep.png").is_file()


def test_cli_lrs_and_early_stop(tmp_path):
    rc = main(["compare", "--preset", "quick", "--tasks", "mqar", "--mixers", "softmax", "--lrs", "1e-3,1e-2",
               "--early-stop", "0.99", "--steps", "4", "--threads", "1", "--out", str(tmp_path), "--name", "x"])  # fmt: skip
    results = json.loads((tmp_path / "x" / "results.json").read_text())
    assert (
        rc == 0
        and len(results["runs"]) == 2
        and results["config"]["task_config"]["mqar"]["lrs"] == [1e-3, 1e-2]
    )
    assert "--lrs 1e-3,1e-2 --early-stop 0.99" in results["command"]
    assert "best lr" in (tmp_path / "x" / "report.md").read_text()


def test_zoology_presets_are_sized_as_documented():
    cpu = PRESETS["zoology_cpu"]
    assert isinstance(cpu, Preset) and cpu.early_stop == 0.99 and len(cpu.settings("mqar")) == 4
    assert {s.budget.d_model for s in cpu.settings("mqar")} == {32, 64} and cpu.lrs_until_solved


def test_a_mixer_that_solves_skips_its_later_learning_rates(tmp_path, monkeypatch):
    import gatelab.lab.comparison as comparison

    def fake_run_one(spec, task, run_dir, progress, kv_cache, overwrite, setting, lr_sweep):
        solved = spec.label == "softmax"  # softmax solves at its first learning rate, gla never
        return {**comparison.run_entry(spec, setting, lr_sweep), "final": {"loss": 0.1, "accuracy": 1.0 if solved
                else 0.3}, "stopped_early": solved, "steps": 2, "tokens_per_s": 1.0, "wall_s": 0.0}  # fmt: skip

    monkeypatch.setattr(comparison, "run_one", fake_run_one)
    monkeypatch.setattr(
        comparison, "write_report", lambda *a, **k: {"report": tmp_path / "r.md"}, raising=False
    )
    preset = PRESETS["quick"].replace(lrs=(1e-3, 3e-3), early_stop=0.99, lrs_until_solved=True)
    results = compare(preset, mixers="softmax,gla", tasks=["mqar"], out=tmp_path, threads=1, device="cpu")
    status = [(r["mixer"], r["lr"], r["status"]) for r in results["runs"]]
    assert status == [
        ("softmax", 1e-3, "ok"),
        ("softmax", 3e-3, "skipped"),
        ("gla", 1e-3, "ok"),
        ("gla", 3e-3, "ok"),
    ]
    softmax = results["aggregate"]["mqar"]["softmax"]
    assert softmax["solved"]["mean"] == 1.0 and softmax["best_lr"]["mean"] == 1e-3  # the lr that solved
    assert softmax["lr_range"]["min"] == softmax["lr_range"]["max"] == 1.0


def test_workers_split_the_runs_and_merge_one_report(tmp_path):
    results = compare("quick", mixers="softmax,gla", tasks=["mqar"], steps=2, lrs="1e-3,3e-3", workers=2,
                      out=tmp_path, name="w", device="cpu")  # fmt: skip
    assert len(results["runs"]) == 4 and {r["status"] for r in results["runs"]} == {"ok"}
    assert (tmp_path / "w" / "report.md").is_file() and (
        tmp_path / "w" / "shards" / "2" / "results.json"
    ).is_file()
    for run in results["runs"]:  # the merged folder finds every model
        assert (tmp_path / "w" / run["model_dir"] / "model.safetensors").is_file()
    from gatelab.lab.inspect import find_model_dirs

    assert len(find_model_dirs(tmp_path / "w")) == 4  # gatelab inspect of the run sees its shards' models
    with pytest.raises(ValueError, match="drop --shard"):
        compare("quick", workers=2, shard="1/2", out=tmp_path)
