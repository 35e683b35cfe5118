"""`gatelab merge`: a folder given twice counts its seeds once, the output is a new folder (never an input),
inputs that are not comparisons or that disagree are refused with the file named."""

import json

import pytest

from gatelab.cli import main
from gatelab.lab.report import merge_results, write_report


def _run(mixer, seed, loss):
    history = [
        {"step": 1, "split": "train", "loss": loss, "lr": 1e-3},
        {"step": 1, "split": "val", "loss": loss},
    ]
    return {"mixer": mixer, "task": "mqar", "seed": seed, "status": "ok", "final": {"loss": loss},
            "history": history, "tokens_per_s": 1.0, "params": 10, "wall_s": 1.0, "diagnostics": {}}  # fmt: skip


def _folder(path, seed, loss=1.0, steps=10, status="ok"):
    run = _run("softmax", seed, loss)
    if status != "ok":
        run = {"mixer": "softmax", "task": "mqar", "seed": seed, "status": status, "error": "boom"}
    budget = {"n_layers": 2, "d_model": 8, "n_heads": 2, "steps": steps, "batch_size": 4, "lr": 1e-3}
    config = {"preset": "p", "description": "", "mixers": ["softmax"], "tasks": ["mqar"], "seeds": [seed],
              "task_config": {"mqar": budget}, "task_mixers": {"mqar": ["softmax"]},
              "variants": {"softmax": {"key": "softmax", "options": {}}}}  # fmt: skip
    results = {
        "name": path.name,
        "config": config,
        "environment": {},
        "tasks": {},
        "runs": [run],
        "wall_s": 1.0,
    }
    write_report(path, results)
    return path


def test_a_folder_given_twice_counts_once(tmp_path):
    a = _folder(tmp_path / "a", seed=0)
    merged = merge_results([a, a], tmp_path / "m")
    assert len(merged["runs"]) == 1 and merged["duplicate_runs"] == 1
    assert merged["aggregate"]["mqar"]["softmax"]["loss"]["n"] == 1
    b = _folder(tmp_path / "b", seed=1, loss=3.0)
    merged = merge_results([a, b, a], tmp_path / "m2")
    assert merged["aggregate"]["mqar"]["softmax"]["loss"]["mean"] == 2.0
    assert merged["aggregate"]["mqar"]["softmax"]["loss"]["n"] == 2


def test_a_successful_rerun_replaces_a_failed_run(tmp_path):
    failed = _folder(tmp_path / "failed", seed=0, status="error")
    rerun = _folder(tmp_path / "rerun", seed=0, loss=2.0)
    merged = merge_results([failed, rerun], tmp_path / "m")
    assert [r["status"] for r in merged["runs"]] == ["ok"] and merged["duplicate_runs"] == 1


def test_the_output_is_never_an_input_nor_an_earlier_merge(tmp_path, capsys):
    a, b = _folder(tmp_path / "a", seed=0), _folder(tmp_path / "b", seed=1)
    before = (a / "results.json").read_bytes()
    with pytest.raises(ValueError, match="is one of the run folders"):
        merge_results([a, b], a)
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "." / "a")]) == 2
    assert "is one of the run folders to merge" in capsys.readouterr().err
    assert (a / "results.json").read_bytes() == before
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--overwrite"]) == 0


def test_malformed_or_disagreeing_inputs_are_named(tmp_path, capsys):
    a = _folder(tmp_path / "a", seed=0)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "results.json").write_text('{"config": {"preset"')
    with pytest.raises(ValueError, match=f"{torn}/results.json: not valid JSON"):
        merge_results([a, torn], tmp_path / "m")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "results.json").write_text(json.dumps({"tasks": {}, "policies": ["full"]}))
    assert main(["merge", str(a), str(cache), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gatelab merge: error:") and "not a gatelab compare results.json" in err
    assert str(cache) in err and len(err.splitlines()) == 1
    longer = _folder(tmp_path / "longer", seed=1, steps=20)
    with pytest.raises(ValueError, match="disagree on task_config\\['mqar'\\]"):
        merge_results([a, longer], tmp_path / "m")
    assert not (tmp_path / "m" / "results.json").exists()
