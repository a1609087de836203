"""Nothing a user had is overwritten: shards, run folders, comparison results."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from engine_helpers import TINY, python_cmd, run
from vitmpp.common.errors import UserError
from vitmpp.datasets import read_manifest

pytestmark = pytest.mark.slow


@pytest.mark.fault("make_shards into an existing folder", expect="clear error")
def test_make_shards_refuses_an_existing_folder(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = run(
        [sys.executable, "-m", "vitmpp.datasets.make_shards", "--source", "digits", "--out", str(out), "--quiet"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "mine.txt").read_text() == "keep me" and list(out.iterdir()) == [out / "mine.txt"]


@pytest.mark.fault("make_shards killed (SIGKILL) mid-write", expect="survived")
def test_a_killed_write_leaves_no_complete_looking_folder(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitmpp.datasets.make_shards",
            "--source",
            "synthetic",
            "--count",
            "100000",
            "--image-size",
            "16",
            "--maxcount",
            "100",
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until a few shards have been written
            partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # common.io.atomic_dir
            if partial and len(list(partial[0].glob("*.tar"))) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("make_shards wrote no shards in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert not list(tmp_path.rglob("_info.json"))
    with pytest.raises(UserError, match=f"Shards '{out}' do not exist"):  # the killed write left no folder
        read_manifest(out)


@pytest.mark.fault("pretraining into a run folder that holds another run", expect="clear error")
def test_run_folder_is_not_reused_and_batches_must_divide(tmp_path, digits16):
    common = TINY + ["train.steps=1", f"data.shards={digits16}"]
    run(python_cmd("pretrain/main.py") + common, cwd=tmp_path)
    again = run(python_cmd("pretrain/main.py") + common + ["optim.lr=0.5"], cwd=tmp_path, check=False)
    assert again.returncode == 2 and "different config (keys optim.lr)" in again.stderr
    same = run(python_cmd("pretrain/main.py") + common, cwd=tmp_path, check=False)
    assert same.returncode == 2 and "--resume auto" in same.stderr
    bad = run(
        python_cmd("pretrain/main.py")
        + TINY
        + ["train.global_batch=30", "train.per_device_batch=8", f"data.shards={digits16}", "run.name=bad"],
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "not a multiple of train.per_device_batch=8" in bad.stderr
    assert "Traceback" not in bad.stderr
