"""Run folders are not overwritten or shared by accident (compare, cache, train), and inputs the commands
would silently ignore are refused: each a one-line `gatelab <cmd>: error: ...` and exit status 2."""

import json

import pytest
import torch

from gatelab.cli import main
from gatelab.lab import rundir

TINY = ["--preset", "quick", "--mixers", "softmax", "--tasks", "mqar", "--steps", "1", "--threads", "1"]
CACHE = ["cache", "--quick", "--tasks", "mqar", "--budgets", "1.0", "--policies", "full"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_compare_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
    argv = ["compare", *TINY, "--out", str(tmp_path), "--name", "r"]
    assert main(argv) == 0
    first = (tmp_path / "r" / "results.json").read_text()
    assert main(argv) == 2
    assert "already holds results.json, models" in _error(capsys)
    assert (tmp_path / "r" / "results.json").read_text() == first
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["runs"][0]["status"] == "ok"


def test_compare_passes_overwrite_to_every_training(tmp_path, monkeypatch):
    from gatelab.lab.train import train

    seen = []

    def spy(model, task, config):
        seen.append(config.overwrite)
        with pytest.raises(rundir.RunDirBusy):  # the comparison holds its folder while it trains
            with rundir.locked(tmp_path / "r"):
                pass
        return train(model, task, config)

    monkeypatch.setattr("gatelab.lab.train.train", spy)
    assert main(["compare", *TINY, "--out", str(tmp_path), "--name", "r"]) == 0
    assert main(["compare", *TINY, "--out", str(tmp_path), "--name", "r", "--overwrite"]) == 0
    assert seen == [False, True]


def test_a_busy_run_folder_is_refused(tmp_path, capsys):
    with rundir.locked(tmp_path / "r"):  # another gatelab process writing into the folder
        assert main(["compare", *TINY, "--out", str(tmp_path), "--name", "r"]) == 2
        assert "in use by another gatelab process" in _error(capsys)
        assert main([*CACHE, "--out", str(tmp_path / "r")]) == 2
        assert "in use by another gatelab process" in _error(capsys)
    assert not (tmp_path / "r" / "results.json").exists()


def test_cache_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    assert main([*CACHE, "--out", str(out)]) == 0
    assert main([*CACHE, "--out", str(out)]) == 2
    assert "already holds results.json" in _error(capsys)
    assert main([*CACHE, "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", *TINY, "--corpus", "README.md"], "--corpus applies to the text task"),
        (["train", "--task", "mqar", "--corpus", "README.md"], "--corpus applies to --task text only"),
        (["train", "--mixer-option", "gla.expand_k=1"], "mixer options for 'gla', not in the pattern 'softmax'"),
        (["train", "--mixer-option", "gated_softmax.gate=bogus", "--pattern", "gated_softmax"], "gate"),
        (["compare", *TINY[:2], "--tasks", "mqar", "--mixers", "gated_softmax[gate=bogus]"],
         "gated_softmax[gate=bogus]: gated_softmax options"),
        (["compare", *TINY[:2], "--tasks", "mqar", "--mixers", "gated_softmax[gat=headwise]"], "valid options"),
        (["list", "--family", "bogus"], "unknown family 'bogus'; families: "),
    ],
)  # fmt: skip
def test_inputs_that_would_be_ignored_are_refused(argv, message, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")] if argv[0] != "list" else []
    assert main([*argv, *out]) == 2
    err = _error(capsys)
    assert err.startswith(f"gatelab {argv[0]}: error:") and message in err
    assert not (tmp_path / "o").exists()  # refused before a folder was made
