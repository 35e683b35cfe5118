"""``gatelab inspect`` on a folder with bad models in it: each bad one is named with its file and skipped,
the others are inspected, and the exit status says that something was skipped."""

import json
import sys

import pytest

from gatelab.cli import main
from gatelab.lab.inspect import find_model_dirs, task_of
from gatelab.lab.models.lm import LM, LMConfig
from gatelab.lab.tasks import make_task
from gatelab.lab.train import TrainConfig, train

TASK = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}
ARGS = ["--batches", "1", "--batch-size", "2", "--no-quant", "--json"]


@pytest.fixture
def run(tmp_path):
    """A run folder with two small trained models, models/a and models/b."""
    for name in ("a", "b"):
        model = LM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, seed=0))
        config = TrainConfig(steps=2, batch_size=4, warmup=1, eval_every=0, eval_batches=1, progress=False,
                             out_dir=str(tmp_path / "models" / name))  # fmt: skip
        train(model, make_task("mqar", **TASK), config)
    return tmp_path


def inspect(run, capsys, *extra):
    rc = main(["inspect", str(run), *ARGS, *extra])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def test_a_good_folder_inspects_every_model(run, capsys):
    rc, results, err = inspect(run, capsys)
    assert rc == 0 and all("layers" in r for r in results.values()) and len(results) == 2


def test_a_malformed_summary_is_named_and_the_others_go_on(run, capsys):
    (run / "models" / "a" / "train_summary.json").write_text('{"task": {"name": "mq')
    rc, results, err = inspect(run, capsys)
    assert rc == 1 and "layers" in results[str(run / "models" / "b")]
    error = results[str(run / "models" / "a")]["error"]
    assert "train_summary.json" in error and "not valid JSON" in error and "--task" in error
    assert "1 of 2 model(s) could not be inspected" in err
    # with --task the model is inspected all the same (on that task's defaults), and the summary is said
    LM(LMConfig(vocab_size=128, d_model=16, n_layers=1, n_heads=2, max_seq_len=128)).save(
        run / "models" / "a"
    )
    rc, results, err = inspect(run, capsys, "--task", "idle", "--models", "a")
    assert rc == 0 and "layers" in results[str(run / "models" / "a")]
    assert "train_summary.json" in err and "default options" in err
    (run / "models" / "a" / "train_summary.json").write_text("[1, 2]")
    rc, results, _ = inspect(run, capsys, "--models", "a")
    assert rc == 1 and "is not a train summary" in results[str(run / "models" / "a")]["error"]


def test_a_truncated_model_is_named_and_the_others_go_on(run, capsys):
    path = run / "models" / "b" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    rc, results, err = inspect(run, capsys)
    assert rc == 1 and "layers" in results[str(run / "models" / "a")]
    assert "model.safetensors" in results[str(run / "models" / "b")]["error"]
    assert f"skipped {run / 'models' / 'b'}" in err


def test_task_of_reads_the_recorded_task(run):
    task = task_of(run / "models" / "a", None)
    assert task.name == "mqar" and task.options["num_kv_pairs"] == 2
    assert find_model_dirs(run, "a") == [run / "models" / "a"]
    with pytest.raises(ValueError, match="glob of folder names"):
        find_model_dirs(run, "../a")


def test_hf_and_run_arguments_are_checked_before_any_work(run, capsys):
    for args, message in (
        ([], "either a run"),
        ([str(run), "--hf", "minilm"], "either a run"),
        ([str(run), "--text", "t.txt"], "only apply with --hf"),
        ([str(run), "--out", str(run / "o")], "only apply with --hf"),
        (["--hf", "minilm", "--task", "mqar"], "not to --hf"),
    ):
        assert main(["inspect", *args]) != 0 and message in capsys.readouterr().err


def test_the_core_package_never_imports_transformers():
    """transformers is optional: importing the package, the CLI and even gatelab.lab.diagnostics.hf loads none of it."""
    import subprocess
    import sys

    code = (
        "import sys, gatelab, gatelab.cli, gatelab.lab.inspect, gatelab.commands.inspect, gatelab.lab.diagnostics.hf; "
        "print(any(m == 'transformers' or m.startswith('transformers.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hf_without_transformers_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["inspect", "--hf", "minilm"]) != 0
    assert "pip install gatelab[hf]" in capsys.readouterr().err


def test_a_text_run_recorded_before_bos_is_rebuilt_without_it(tmp_path):
    """A train summary whose text task has no "bos" option was trained on bytes only (vocab 256)."""
    options = {"seq_len": 16, "max_bytes": 50_000}
    (tmp_path / "train_summary.json").write_text(
        json.dumps({"task": {"name": "text"}, "task_options": options})
    )
    task = task_of(tmp_path, None)
    assert task.options["bos"] is False and task.vocab_size == 256 and task.bos_token is None
    options["bos"] = True
    (tmp_path / "train_summary.json").write_text(
        json.dumps({"task": {"name": "text"}, "task_options": options})
    )
    task = task_of(tmp_path, None)
    assert task.vocab_size == 257 and task.bos_token == 256
