"""`gatelab compare` end to end on the quick preset (every causal mixer in the registry), `gatelab inspect`
on what it saved, and the clear errors for bad arguments."""

import json
import math

import pytest
import torch

pytest.importorskip("gatelab.lab.train")
pytest.importorskip("gatelab.lab.models.lm")

from gatelab.cli import main  # noqa: E402
from gatelab.commands.compare import check_memory, select_mixers  # noqa: E402
from gatelab.lab.presets import PRESETS  # noqa: E402
from gatelab.registry import list_mechanisms  # noqa: E402

PNGS = ("loss_curves", "mqar_accuracy", "sink_share", "bos_share", "max_activation", "speed")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:  # the quick preset exactly as a user runs it (~15 s of CPU): CI's smoke test of the whole lab
        rc = main(
            [
                "compare",
                "--preset",
                "quick",
                "--threads",
                "1",
                "--out",
                str(out),
                "--name",
                "smoke",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    return rc, out / "smoke"


def test_quick_compare_runs_every_causal_mixer(quick_run):
    rc, run_dir = quick_run
    results = json.loads((run_dir / "results.json").read_text())
    causal = {s.key for s in list_mechanisms(causal=True)}
    mixers = results["config"]["mixers"]
    assert set(mixers) == causal
    preferred = [k for k in ("softmax", "gated_softmax", "clipped_softmax") if k in causal]
    assert mixers[: len(preferred)] == preferred
    assert results["config"]["tasks"] == ["mqar", "text", "idle"]
    assert len(results["runs"]) == len(mixers) * 3
    failed = [(r["mixer"], r["task"], r.get("error")) for r in results["runs"] if r["status"] != "ok"]
    assert not failed and rc == 0, failed
    assert results["environment"]["torch"] == torch.__version__ and results["environment"]["device"] == "cpu"
    text_info = results["tasks"]["text"]
    assert text_info["vocab_size"] == 257 and text_info["bos"] is True and text_info["train_documents"] > 0
    for run in results["runs"]:
        assert math.isfinite(run["final"]["loss"]) and run["tokens_per_s"] > 0 and run["params"] > 0
        steps = PRESETS["quick"].for_task(run["task"]).steps
        assert [r["step"] for r in run["history"] if r["split"] == "train"] == list(range(1, steps + 1))
        diag = run["diagnostics"]
        assert (
            len(diag["layers"]) == 2 and len(diag["max_activation"]) == 3 and len(diag["block_inf_norm"]) == 2
        )
        assert diag["summary"]["w8a8_gap"] is not None
        assert (run_dir / run["model_dir"] / "model.safetensors").is_file()
        if run["mixer"] == "softmax":  # plain attention always exposes its probabilities
            assert all(0 < s <= 1 for s in diag["sink_share_layer"])
            assert diag["gate_mean"] == [None, None]
            if run["task"] == "text":  # windows start with BOS: position 0 is both the first token and BOS
                assert all(b >= s - 1e-6 for b, s in zip(diag["bos_share_layer"], diag["sink_share_layer"]))
                assert 0 < diag["summary"]["bos_share"] <= 1 and diag["summary"]["bos_share_uniform"] > 0
        if run["task"] != "text":  # mqar and idle report no BOS share
            assert diag["summary"]["bos_share"] is None and diag["bos_share_layer"] == [None, None]
    text_run = next(r for r in results["runs"] if r["task"] == "text")
    assert text_run["task_info"] == results["tasks"]["text"]
    agg = results["aggregate"]
    assert set(agg) == {"mqar", "text", "idle"} and set(agg["mqar"]) == set(mixers)


def test_quick_compare_writes_report_and_plots(quick_run):
    _, run_dir = quick_run
    report = (run_dir / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    for task in ("mqar", "text", "idle"):
        assert f"## {task} (" in report
    for mixer in results["config"]["mixers"]:
        assert report.count(f"| {mixer} |") == 3
    text_table = report.split("## text (")[1].split("## idle (")[0]
    assert "BOS share |" in text_table and "BOS share" not in report.split("## text (")[0].split("Columns")[0]
    for name in PNGS:
        png = (run_dir / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
        assert f"]({name}.png)" in report


def test_inspect_prints_the_diagnostics_of_saved_models(quick_run, capsys):
    _, run_dir = quick_run
    model_dir = run_dir / "models" / "softmax__mqar__seed0"
    capsys.readouterr()
    assert main(["inspect", str(model_dir), "--batches", "1", "--batch-size", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data.values()
    assert result["layers"] == ["softmax", "softmax"] and result["n_sequences"] == 4
    T = PRESETS["quick"].task_options["mqar"]["seq_len"]
    assert result["sink_share_uniform"] == pytest.approx(sum(1 / (t + 1) for t in range(T)) / T)
    assert (
        main(
            [
                "inspect",
                str(run_dir),
                "--models",
                "softmax__*",
                "--batches",
                "1",
                "--batch-size",
                "2",
                "--no-quant",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for task in ("mqar", "text", "idle"):
        assert f"softmax__{task}__seed0 on {task}" in out
    assert "sink share" in out and "gated_softmax__" not in out
    assert "BOS share" in out and "position 1 share" in out  # the text model's table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mixers", "softmax,nope"], "unknown mixer 'nope'"),
        (["--tasks", "mqar,poetry"], "unknown task 'poetry'"),
        (["--tasks", "text", "--corpus", "/no/such/corpus"], "no such file"),
        (["--steps", "0"], "--steps must be a positive int"),
        (["--batch-size", "100000000"], "GiB"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nodevice"], "--device"),
    ],
)
def test_bad_arguments_give_clear_errors(args, message, tmp_path, capsys):
    assert main(["compare", "--preset", "quick", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*/models/*"))  # refused before any training


def test_unknown_preset_and_empty_inspect_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--preset", "huge"])
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds no saved model" in capsys.readouterr().err


def test_preset_mixers_missing_from_the_registry_are_reported_not_run():
    preset = PRESETS["quick"].replace(mixers=("softmax", "not_yet_written"))
    mixers, skipped = select_mixers(None, preset)
    assert [v.name for v in mixers] == ["softmax"] and skipped == {"not_yet_written": "not in the registry"}


def test_memory_check_refuses_sizes_that_do_not_fit():
    from gatelab.lab.tasks import make_task

    task = make_task("mqar", vocab_size=64, seq_len=32, num_kv_pairs=4)
    check_memory(PRESETS["quick"], task, "cpu", available=2**30)
    with pytest.raises(ValueError, match="lower --batch-size"):
        check_memory(PRESETS["quick"], task, "cpu", available=2**20)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fit_their_tasks(name):
    from gatelab.lab.tasks import VISION_TASKS, make_task

    preset = PRESETS[name]
    for task_name in preset.tasks:
        options = dict(preset.task_options[task_name])
        options.pop("max_bytes", None)
        if task_name in VISION_TASKS:  # images: the evaluation walks the held-out split, all of it
            task = make_task(task_name, **options)
            assert preset.for_task(task_name).eval_batches * preset.eval_batch_size >= len(task.split["val"])
        elif task_name != "text":
            task = make_task(task_name, **options)
            assert task.seq_len == options["seq_len"]


def test_task_overrides_and_command_line_overrides():
    from gatelab.commands.compare import apply_overrides

    preset = PRESETS["reproduce"]
    assert preset.for_task("mqar").n_layers == 2 and preset.for_task("idle").n_layers == 4
    assert preset.for_task("text").steps == 1000 and preset.for_task("idle").steps == preset.steps
    mixers, _ = select_mixers(None, preset.for_task("mqar"))
    assert "gated_deltanet" in [v.name for v in mixers] or "gated_deltanet" not in {
        s.key for s in list_mechanisms()
    }
    cut = apply_overrides(preset, steps=7, batch_size=None, seeds=1)
    for task in preset.tasks:  # --steps wins over every task's own step count; sizes stay per task
        assert cut.for_task(task).steps == 7 and cut.for_task(task).eval_every == 7
    assert cut.for_task("mqar").n_layers == 2 and cut.seeds == 1
    with pytest.raises(ValueError, match="--batch-size must be a positive int"):
        apply_overrides(preset, batch_size=0)
    with pytest.raises(ValueError, match="unknown fields"):
        preset.replace(task_overrides={"mqar": {"stepz": 3}})


def test_quick_compare_reports_routing_and_compute(quick_run):
    """Every LM run reports FLOPs/token at its task's length (softmax and linear baselines included) and
    decode ms/token; router runs their routed fraction; one quality-vs-compute plot per task."""
    _, run_dir = quick_run
    results = json.loads((run_dir / "results.json").read_text())
    for run in results["runs"]:
        compute = run["compute"]
        assert compute["decode_ms_per_token"] > 0 and compute["seq_len"] > 1
        if run["mixer"] in ("softmax", "gated_deltanet", "sliding_window", "flux"):
            assert compute["flops_per_token"] > 0, run["mixer"]
        route = compute["route"]
        if run["mixer"] == "flux":
            assert 0 <= route["expensive_fraction"] <= 1 and route["unit"] == "layers"
        elif run["mixer"] in ("softmax", "gated_deltanet"):
            assert route is None
    report = (run_dir / "report.md").read_text()
    assert "routed expensive" in report and "FLOPs/token" in report and "decode ms/token" in report
    for task in ("mqar", "text", "idle"):
        png = (run_dir / f"quality_vs_compute_{task}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", task
