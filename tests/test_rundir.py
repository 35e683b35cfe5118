"""Run folders (gatelab.lab.rundir): atomic writes, the folder lock (nesting in one process, refusing a
second process), the refusal to overwrite, manifests, and readers whose errors name the file."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from gatelab.lab import rundir
from gatelab.lab.rundir import IntegrityError, RunDirBusy


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    rundir.atomic_write_json(tmp_path / "a.json", {"x": 1})
    rundir.atomic_write_text(tmp_path / "a.json", '{"x": 2}')
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_check_writable_names_the_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"out: cannot create the folder .*file/sub"):
        rundir.check_writable(tmp_path / "file" / "sub")
    assert rundir.check_writable(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"


def hold_lock_in_another_process(folder):
    code = (
        "import sys, time\nfrom gatelab.lab.rundir import locked\n"
        f"with locked({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_lock_refuses_a_second_holder(tmp_path):
    with rundir.locked(tmp_path):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"), rundir.locked(tmp_path / "."):
            pass
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by another gatelab process \(pid {holder.pid}\)"):
            with rundir.locked(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rundir.locked(tmp_path):  # released with its process
        pass


def test_refuse_existing(tmp_path):
    rundir.refuse_existing(tmp_path, ["results.json"], overwrite=False)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="results.json from an earlier run; pass --overwrite"):
        rundir.refuse_existing(tmp_path, ["results.json", "other"], overwrite=False)
    rundir.refuse_existing(tmp_path, ["results.json"], overwrite=True)


def test_manifest_names_the_file_that_changed_is_missing_or_outside(tmp_path):
    for name in ("a.bin", "b.txt"):
        (tmp_path / name).write_bytes(b"0123456789")
    rundir.write_manifest(tmp_path, ["a.bin", "b.txt"])
    assert set(rundir.verify_manifest(tmp_path)) == {"a.bin", "b.txt"}
    (tmp_path / "b.txt").write_bytes(b"0123456780")
    with pytest.raises(IntegrityError, match=r"b\.txt.*changed"):
        rundir.verify_manifest(tmp_path)
    (tmp_path / "b.txt").unlink()
    with pytest.raises(IntegrityError, match=r"b\.txt.*missing"):
        rundir.verify_manifest(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"] = {"../a.bin": manifest["files"]["a.bin"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="outside its folder"):
        rundir.verify_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(IntegrityError, match="not a gatelab manifest"):
        rundir.verify_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    assert rundir.verify_manifest(tmp_path, required=False) == {}
    with pytest.raises(IntegrityError, match="missing"):
        rundir.verify_manifest(tmp_path)


def test_readers_name_a_torn_file(tmp_path):
    (tmp_path / "a.json").write_text('{"a": [1, 2')
    with pytest.raises(IntegrityError, match=r"a\.json.*not valid JSON"):
        rundir.read_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe")
    with pytest.raises(IntegrityError, match=r"b\.json.*not a text file"):
        rundir.read_json(tmp_path / "b.json")
    save_file({"w": torch.arange(6.0)}, str(tmp_path / "m.safetensors"))
    assert torch.equal(rundir.read_safetensors(tmp_path / "m.safetensors")["w"], torch.arange(6.0))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-5])
    with pytest.raises(IntegrityError, match=r"m\.safetensors.*truncated"):
        rundir.read_safetensors(tmp_path / "m.safetensors")
    with pytest.raises(IntegrityError, match=r"none\.safetensors"):
        rundir.read_safetensors(tmp_path / "none.safetensors")
